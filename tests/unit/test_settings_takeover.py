"""``communicator.takeover-limit`` and ``communicator.takeover-window``: defaults, values and
ranges (the client id clash detection of ``MqttTransport.run``)."""

from __future__ import annotations

import pytest

from asyncmigfra.errors import ConfigError
from asyncmigfra.settings import MqttSettings, settings_from_text


def communicator(body: str) -> MqttSettings:
    return settings_from_text(f"communicator: {{{body}}}\n", hostname="node1").mqtt


def test_defaults() -> None:
    mqtt = settings_from_text("", hostname="node1").mqtt
    assert mqtt.takeover_limit == 5
    assert mqtt.takeover_window == 60.0


def test_values_are_read() -> None:
    mqtt = communicator("takeover-limit: 3, takeover-window: 30")
    assert mqtt.takeover_limit == 3
    assert mqtt.takeover_window == 30.0


def test_zero_limit_means_never_give_up() -> None:
    assert communicator("takeover-limit: 0").takeover_limit == 0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(
            "takeover-limit: -1",
            "communicator.takeover-limit: must be at least 0, got -1",
            id="limit-negative",
        ),
        pytest.param(
            "takeover-limit: 1.5",
            "communicator.takeover-limit: expected an integer, got 1.5",
            id="limit-float",
        ),
        pytest.param(
            "takeover-window: 0",
            "communicator.takeover-window: must be greater than 0, got 0",
            id="window-zero",
        ),
        pytest.param(
            "takeover-window: -5",
            "communicator.takeover-window: must be greater than 0, got -5",
            id="window-negative",
        ),
    ],
)
def test_out_of_range_values_name_the_key(body: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        communicator(body)
    assert str(info.value) == message
