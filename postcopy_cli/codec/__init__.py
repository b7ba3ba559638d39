"""Sans-IO codec of the postcopy wire protocol (DESIGN.md section 4).

No sockets and no files: :func:`encode` / :func:`encode_rp` /
:class:`RamSectionEncoder` turn messages into bytes, :class:`StreamDecoder`
and :class:`ReturnPathDecoder` turn bytes fed in arbitrary pieces back into
messages, validating everything a peer sends (``ProtocolError``).
:class:`PumpedDecoder` is the one hand-over between a decoder and a native
fast path reading the same stream (the destination's pump, the source's
request server).
"""
from .constants import (MAGIC, MAX_DISCARDS_PER_COMMAND, MIGRATION_ID_LENGTH, MAX_NAME_LENGTH, MAX_STATE_LENGTH, RECV_BITMAP_ENDING,
                        TARGET_PAGE_SIZE, VERSION, Command, RamFlag, RpType, Section)
from .states import PostcopyState
from .decode import NEED_DATA, ReturnPathDecoder, StreamDecoder
from .pumped import PumpedDecoder
from .encode import (RamSectionEncoder, encode, encode_discard_payload, encode_name, encode_ram_section,
                     encode_rp)
from .messages import (NO_MIGRATION_ID, BlockInfo, Blocks, Eof, Header, MigrationId, OpenReturnPath, Ping, Pong, PostcopyAdvise,
                       PostcopyListen, PostcopyRamDiscard, PreemptChannel, Resume, PostcopyResume, PostcopyRun, RamEnd,
                       RamPage, RamZero, RecvBitmap, RecvBitmapRequest, ReqPages, ReqPagesId, ResumeAck, Shut,
                       State)

__all__ = [
    "MAGIC", "VERSION", "TARGET_PAGE_SIZE", "RECV_BITMAP_ENDING", "MAX_DISCARDS_PER_COMMAND", "MAX_NAME_LENGTH",
    "MAX_STATE_LENGTH", "MIGRATION_ID_LENGTH", "Section", "Command", "RpType", "RamFlag", "PostcopyState",
    "Header", "BlockInfo", "Blocks", "RamPage", "RamZero", "RamEnd", "State", "OpenReturnPath", "Ping",
    "PostcopyAdvise", "PostcopyListen", "PostcopyRun", "PostcopyRamDiscard", "PostcopyResume",
    "RecvBitmapRequest", "Eof", "MigrationId", "NO_MIGRATION_ID", "PreemptChannel", "Resume", "Shut", "Pong", "ReqPagesId", "ReqPages", "RecvBitmap", "ResumeAck",
    "encode", "encode_rp", "encode_name", "encode_discard_payload", "RamSectionEncoder", "encode_ram_section",
    "StreamDecoder", "ReturnPathDecoder", "NEED_DATA", "PumpedDecoder",
]
