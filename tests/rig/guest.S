/*
 * The rig's test guest: a few hundred bytes of 32-bit multiboot (v1) kernel.
 *
 * Why a hand-made kernel: the migration tests need a guest that boots in well under a second
 * under TCG, needs no disk image, no distro kernel and no network, and whose memory state can
 * be observed from the host. QEMU's built-in multiboot loader (libvirt <os><kernel>) starts
 * it directly in flat 32-bit protected mode, so there is no boot loader and no mode switching.
 *
 * Build knobs (tests/rig/guest.py passes them with `as --defsym`):
 *   DIRTY_MIB  MiB of RAM rewritten on every pass, one 32-bit word per 4 KiB page, starting
 *              at 4 MiB (0 = the idle variant: it only bumps the counter)
 *   SPIN       busy-wait iterations after each page write; bounds the dirty rate so that
 *              throttling (auto-converge) can win
 *   BALLOON    1 = a cooperative virtio balloon "driver" (default 0: none, and not a byte of
 *              code for it). At boot the guest looks for a virtio-balloon on PCI bus 0
 *              (vendor 0x1AF4, device 0x1002: the legacy/transitional virtio-pci device that
 *              libvirt's <memballoon model='virtio'/> gives on machine type pc), sets I/O
 *              decoding in its command register and its device status to ACKNOWLEDGE|DRIVER.
 *              Then, on every pass, it copies the balloon's target `num_pages` into `actual`:
 *              it gives no page back, but QEMU takes `actual` from the config write and emits
 *              BALLOON_CHANGE, from which libvirt updates the domain's current memory. Legacy
 *              virtio I/O BAR0 layout (MSI-X never enabled): status byte at +18, device
 *              config at +20: num_pages (u32) at +20, actual (u32) at +24.
 *
 * State block at guest-physical 0x200000, read by the tests with the HMP command
 * `xp /5wx 0x200000` (libvirt_qemu.qemuMonitorCommand):
 *   +0  pass counter, incremented once per pass; it must keep counting across a migration
 *   +4  signature 0xB007AB1E, written once at boot
 *   +8  DIRTY_MIB of this build
 *   +12 SPIN of this build
 *   +16 BALLOON builds: the balloon's I/O base (BAR0), 0 if no balloon was found; never
 *       written by other builds (fresh RAM reads 0)
 *
 * No interrupts, no stack, no paging. COM1 gets 'R' at boot and '.' every few passes
 * (QEMU's 16550 emulation needs no initialisation to accept bytes). BALLOON builds also
 * send 'B' after 'R' if they found the balloon.
 */

        .ifndef DIRTY_MIB
        .set    DIRTY_MIB, 0
        .endif
        .ifndef SPIN
        .set    SPIN, 0
        .endif
        .ifndef BALLOON
        .set    BALLOON, 0
        .endif

        .set    MB_MAGIC, 0x1BADB002
        .set    MB_FLAGS, 0                     /* we need nothing from the loader */
        .set    STATE, 0x00200000
        .set    SIGNATURE, 0xB007AB1E
        .set    DIRTY_BASE, 0x00400000
        .set    DIRTY_LIMIT, DIRTY_BASE + DIRTY_MIB * 0x100000
        .set    PAGE, 4096
        .set    IDLE_DELAY, 0x00100000          /* loop iterations per idle pass */
        .set    COM1, 0x3F8

        .if     BALLOON
        .set    PCI_ADDR, 0xCF8                 /* PCI configuration mechanism #1 */
        .set    PCI_DATA, 0xCFC
        .set    PCI_ENABLE, 0x80000000          /* bus 0, device/function in bits 15..8 */
        .set    PCI_END, PCI_ENABLE + 0x10000   /* past bus 0's last device/function */
        .set    BALLOON_ID, 0x10021AF4          /* device 0x1002 << 16 | vendor 0x1AF4 */
        .set    PCI_COMMAND, 0x04
        .set    PCI_BAR0, 0x10
        .set    VIRTIO_STATUS, 18               /* legacy virtio header, in BAR0 */
        .set    VIRTIO_ACK_DRIVER, 1 | 2        /* ACKNOWLEDGE | DRIVER */
        .set    BALLOON_NUM_PAGES, 20           /* device config, without MSI-X */
        .set    BALLOON_ACTUAL, 24
        .endif

        .if     DIRTY_MIB
        .set    REPORT_MASK, 0x3FF
        .else
        .set    REPORT_MASK, 0x3F
        .endif

        .macro  serial_out char
        movb    $\char, %al
        movw    $COM1, %dx
        outb    %al, %dx
        .endm

        .text
        .code32
        .globl  _start

        /* The multiboot header must lie, 4-byte aligned, in the first 8 KiB of the file:
         * putting it first in .text (and linking with -N) guarantees that. */
        .align  4
multiboot_header:
        .long   MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

_start:
        cli
        movl    $0, STATE
        movl    $SIGNATURE, STATE + 4
        movl    $DIRTY_MIB, STATE + 8
        movl    $SPIN, STATE + 12
        serial_out 'R'

        .if     BALLOON
        /* Find the balloon: the I/O base goes to %esi (0 = none) and to STATE + 16. */
        xorl    %esi, %esi
        movl    $PCI_ENABLE, %ebx
pci_scan:
        movl    %ebx, %eax
        movw    $PCI_ADDR, %dx
        outl    %eax, %dx
        movw    $PCI_DATA, %dx
        inl     %dx, %eax
        cmpl    $BALLOON_ID, %eax
        je      pci_found
        addl    $0x100, %ebx
        cmpl    $PCI_END, %ebx
        jb      pci_scan
        jmp     balloon_done
pci_found:
        leal    PCI_BAR0(%ebx), %eax
        movw    $PCI_ADDR, %dx
        outl    %eax, %dx
        movw    $PCI_DATA, %dx
        inl     %dx, %eax
        testl   $1, %eax                        /* an I/O BAR, as legacy virtio's is */
        jz      balloon_done
        andl    $0xFFFC, %eax
        jz      balloon_done                    /* not assigned */
        movl    %eax, %esi
        /* Set I/O space decoding (bit 0 of the command register); SeaBIOS did already. */
        leal    PCI_COMMAND(%ebx), %eax
        movw    $PCI_ADDR, %dx
        outl    %eax, %dx
        movw    $PCI_DATA, %dx
        inw     %dx, %ax
        orw     $1, %ax
        outw    %ax, %dx
        leal    VIRTIO_STATUS(%esi), %edx
        movb    $VIRTIO_ACK_DRIVER, %al
        outb    %al, %dx
        serial_out 'B'
balloon_done:
        movl    %esi, STATE + 16
        .endif

pass:
        incl    STATE
        .if     DIRTY_MIB
        /* Write the (non-zero) pass number into every page: zero pages would migrate as
         * cheap "constant" pages and hide the dirtying. */
        movl    STATE, %eax
        movl    $DIRTY_BASE, %edi
touch_page:
        movl    %eax, (%edi)
        .if     SPIN
        movl    $SPIN, %ecx
throttle:
        loop    throttle
        .endif
        addl    $PAGE, %edi
        cmpl    $DIRTY_LIMIT, %edi
        jb      touch_page
        .else
        movl    $IDLE_DELAY, %ecx
idle_delay:
        loop    idle_delay
        .endif

        .if     BALLOON
        /* Follow the balloon's target: actual = num_pages. */
        testl   %esi, %esi
        jz      balloon_skip
        leal    BALLOON_NUM_PAGES(%esi), %edx
        inl     %dx, %eax
        leal    BALLOON_ACTUAL(%esi), %edx
        outl    %eax, %dx
balloon_skip:
        .endif

        testl   $REPORT_MASK, STATE
        jnz     pass
        serial_out '.'
        jmp     pass

        /* no executable stack wanted (silences ld's warning) */
        .section .note.GNU-stack, "", @progbits
