"""Wire constants of the postcopy stream (DESIGN.md section 4).

Command numbers, return-path message types and RAM record flags are QEMU's
(``enum qemu_vm_cmd``, ``enum mig_rp_message_type``, ``RAM_SAVE_FLAG_*``).
"""
from __future__ import annotations

import enum

MAGIC = 0x50435059  # "PCPY"
VERSION = 1
TARGET_PAGE_SIZE = 4096
RECV_BITMAP_ENDING = 0x0123456789ABCDEF
MAX_DISCARDS_PER_COMMAND = 12

#: The largest STATE section the decoder accepts (larger is refused before buffering).
MAX_STATE_LENGTH = 64 * 1024 * 1024
#: The largest block name (u8 length on the wire).
MAX_NAME_LENGTH = 255
#: Bytes of a migration id (the ID and PREEMPT sections).
MIGRATION_ID_LENGTH = 16


class Section(enum.IntEnum):
    BLOCKS = 0x01
    RAM = 0x02
    STATE = 0x03
    #: Right after BLOCKS: the migration id (16 random bytes) and the number of
    #: preempt channels (0 or 1) the source will open.
    ID = 0x04
    COMMAND = 0x08
    EOF = 0x10
    #: First section of a second connection: the preempt channel (QEMU's
    #: postcopy-preempt), which carries only RAM sections (requested pages)
    #: and EOF, so that they never queue behind background pages.
    PREEMPT = 0x20
    #: First section of a new main connection after a failure (post-copy
    #: recovery, DESIGN.md section 9): the 16-byte id of the migration it
    #: resumes; RECV_BITMAP commands and POSTCOPY_RESUME follow.
    RESUME = 0x21


class Command(enum.IntEnum):
    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10


class RpType(enum.IntEnum):
    SHUT = 1
    PONG = 2
    REQ_PAGES_ID = 3
    REQ_PAGES = 4
    RECV_BITMAP = 5
    RESUME_ACK = 6


class RamFlag(enum.IntFlag):
    ZERO = 0x02
    PAGE = 0x08
    EOS = 0x10
    CONTINUE = 0x20


#: Every flag bit a RAM record may carry; anything else in the low 12 bits is refused.
RAM_FLAGS_KNOWN = int(RamFlag.ZERO | RamFlag.PAGE | RamFlag.EOS | RamFlag.CONTINUE)
