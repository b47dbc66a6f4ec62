"""A local streaming runner: Beam's BundleBasedDirectRunner with its override order fixed.

In Beam 2.77 the BundleBasedDirectRunner rejects every splittable DoFn in streaming
mode ("ProcessKeyedElements/GroupByKey ... was not replaced as expected"): the trailing
GroupByKey override re-creates a ``_GroupByKeyOnly`` after the streaming GBK override
already ran. Re-applying the streaming overrides last fixes it. (``DirectRunner`` itself
picks Prism, a download, or the batch FnApiRunner, which runs an unbounded source to its
end before any downstream stage.)
"""

from __future__ import annotations

from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.runners.direct import direct_runner

__all__ = ["StreamingDirectRunner"]

_STREAMING_OVERRIDES = ("StreamingGroupByKeyOverride", "StreamingGroupAlsoByWindowOverride")


def _fixed_overrides(original):
    def overrides(options):
        out = original(options)
        if options.view_as(StandardOptions).streaming:
            out += [o for o in out if type(o).__name__ in _STREAMING_OVERRIDES]
        return out

    return overrides


class StreamingDirectRunner(direct_runner.BundleBasedDirectRunner):
    """BundleBasedDirectRunner that runs splittable-DoFn sources in streaming mode."""

    def run_pipeline(self, pipeline, options):
        original = direct_runner._get_transform_overrides
        direct_runner._get_transform_overrides = _fixed_overrides(original)
        try:
            return super().run_pipeline(pipeline, options)
        finally:
            direct_runner._get_transform_overrides = original
