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
 *
 * State block at guest-physical 0x200000, read by the tests with the HMP command
 * `xp /4wx 0x200000` (libvirt_qemu.qemuMonitorCommand):
 *   +0  pass counter, incremented once per pass; it must keep counting across a migration
 *   +4  signature 0xB007AB1E, written once at boot
 *   +8  DIRTY_MIB of this build
 *   +12 SPIN of this build
 *
 * No interrupts, no stack, no paging. COM1 gets 'R' at boot and '.' every few passes
 * (QEMU's 16550 emulation needs no initialisation to accept bytes).
 */

        .ifndef DIRTY_MIB
        .set    DIRTY_MIB, 0
        .endif
        .ifndef SPIN
        .set    SPIN, 0
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

        testl   $REPORT_MASK, STATE
        jnz     pass
        serial_out '.'
        jmp     pass

        /* no executable stack wanted (silences ld's warning) */
        .section .note.GNU-stack, "", @progbits
