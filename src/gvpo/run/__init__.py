"""The run's bookkeeping: what a run leaves on disk and how it stops and resumes.

- ``folder``: the run folder's guards: no silent reuse, one writer (a lock), which keys a resume may change
- ``checkpoint``: atomic checkpoints, every process its own shards; exact resume; ``final/`` whole or absent
- ``checkpoint_manifest``: a checkpoint's manifest (size and SHA-256 of each file), written last, checked on use
- ``interrupt``: SIGTERM / Ctrl-C: finish the step, checkpoint, say how to resume
- ``metrics``: a step's statistics, ``metrics.jsonl``, the trackers of ``output.report_to``, plots
- ``write_errors``: a failed write (disk full): one line, half-written files removed, what is kept
"""
