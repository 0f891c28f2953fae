"""Where results arrive: futures, the result collector, and decoding of outcomes."""

from idds_fat.results.collector import ResultCollector
from idds_fat.results.futures import AsyncResult, MapResult
from idds_fat.results.outcome import decode_result, remote_exception
from idds_fat.results.rest import RestResultSource

__all__ = [
    "AsyncResult",
    "MapResult",
    "RestResultSource",
    "ResultCollector",
    "decode_result",
    "remote_exception",
]
