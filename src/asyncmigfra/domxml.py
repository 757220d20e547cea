"""Text scans of domain XML from the wire, linear in its length.

Domain XML comes from tasks (``start vm`` with ``xml``), so every scan of it must be bounded
by its length whatever its shape. Python's ``re`` backtracks: ``<name>(.*?)</name>`` took
1.6 s on ``"<name>" * 8000`` (48 KB, parsed on the event loop) and
``<name>\\s*([^<]+?)\\s*</name>`` 34 s on ``"<name>" + " " * 4000`` (a hostile review). These
helpers use ``str.find`` only.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = [
    "AGENT_XML_NAMESPACE",
    "first_element",
    "first_element_text",
    "first_name_text",
    "text_elements",
]

#: Namespaces under this prefix are the agent's own in a domain's ``<metadata>`` (the record
#: of a storage copy's images): never accepted in domain XML from a task.
AGENT_XML_NAMESPACE = "https://asyncmigfra.org/xmlns/"


def first_element_text(xml: str, tag: str) -> str | None:
    """The text between the first ``<tag>`` and the first ``</tag>`` after it (raw, not
    stripped or unescaped), or ``None`` when either is missing.

    This is what ``re.search(r"<tag>(.*?)</tag>", xml, re.DOTALL)`` finds: when the first
    ``<tag>`` has no ``</tag>`` after it, no later one has either.
    """
    opening, closing = f"<{tag}>", f"</{tag}>"
    start = xml.find(opening)
    if start < 0:
        return None
    start += len(opening)
    end = xml.find(closing, start)
    return None if end < 0 else xml[start:end]


def text_elements(xml: str, tag: str) -> Iterator[tuple[str, str]]:
    """``(attributes, stripped text)`` of each ``<tag ...>text</tag>`` whose content is text
    only (no child element), in document order.

    Each candidate is followed to its ``>`` and then to the next ``<``, and the scan goes on
    from there, so every character is looked at a bounded number of times.
    """
    opening, closing = f"<{tag}", f"</{tag}>"
    position = xml.find(opening)
    while position >= 0:
        after = position + len(opening)
        if after < len(xml) and (xml[after].isalnum() or xml[after] in "_-.:"):
            position = xml.find(opening, after)  # a longer tag name (``<namespace>``)
            continue
        close = xml.find(">", after)
        if close < 0:
            return
        end = xml.find("<", close + 1)
        if end < 0:
            return
        if xml.startswith(closing, end):
            yield xml[after:close], xml[close + 1 : end].strip()
        position = xml.find(opening, end)


def first_element(xml: str, tag: str) -> tuple[str, str] | None:
    """``(attributes, stripped text)`` of the first text-only ``<tag>`` element, or ``None``."""
    return next(text_elements(xml, tag), None)


def first_name_text(xml: str) -> str | None:
    """The text of the first ``<name>`` element (no attributes) that is not blank, or
    ``None``: what a back-end reads as the domain's name."""
    for attributes, text in text_elements(xml, "name"):
        if not attributes and text:
            return text
    return None
