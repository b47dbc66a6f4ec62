"""Media path of the ingest job: audio (EnCodec RVQ), image and video (FAISS RVQ) tokenization.

Plain functions/classes do the per-record work (``MediaProcessor``, ``process_audio`` …) so they
are testable and benchmarkable without Beam; ``TokenizeMedia`` and ``MediaHealth`` wrap them.
"""

from .errors import MediaRejected
from .health import CodebookHealth, HealthThresholds
from .process import (
    MediaConfig,
    MediaProcessor,
    Result,
    process_audio,
    process_image,
    process_video,
)
from .transform import MediaHealth, TokenizeMedia

__all__ = [
    "CodebookHealth",
    "HealthThresholds",
    "MediaConfig",
    "MediaHealth",
    "MediaProcessor",
    "MediaRejected",
    "Result",
    "TokenizeMedia",
    "process_audio",
    "process_image",
    "process_video",
]
