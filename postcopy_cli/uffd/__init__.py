"""The userfaultfd binding: a cffi API-mode extension under a small object API."""
from .constants import UFFD_API, UFFD_MSG_SIZE, Event, Feature, Ioctl, PagefaultFlag, RegisterMode, flag_names
from .fd import (ApiInfo, PartialCopy, UffdError, Userfaultfd, check_native, native_error, offered_features,
                 open_raw)
from .messages import (ForkMsg, PagefaultMsg, RemapMsg, RemoveMsg, UffdMsg, UnknownMsg, UnmapMsg,
                       parse_message, parse_messages)

__all__ = [
    "UFFD_API", "UFFD_MSG_SIZE", "Event", "Feature", "Ioctl", "PagefaultFlag", "RegisterMode", "flag_names",
    "ApiInfo", "PartialCopy", "UffdError", "Userfaultfd", "check_native", "native_error", "offered_features",
    "open_raw",
    "ForkMsg", "PagefaultMsg", "RemapMsg", "RemoveMsg", "UffdMsg", "UnknownMsg", "UnmapMsg",
    "parse_message", "parse_messages",
]
