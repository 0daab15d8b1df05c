"""`peftplan profile`: real training steps on the local GPU, measured and held against the estimate.

    nvml     background NVML sampler, timeline analysis and spikes (no torch)
    run      one configuration on CUDA: per-phase torch peaks, NVML, timing, environment
    compare  measurement beside the estimate (and the trace), signed errors, grid summaries
    store    the versioned JSON schema, atomic files under profiles/measured/
    grid     grid files and list-valued options -> points; run them isolated, saving each as it completes
    fake     CPU stand-ins for CUDA and NVML (tests, --dry-run)
    cli      `register(app)` adds the `profile` command

Nothing here imports torch at import time, nor plotly at all (the GPU machine has no plotly).
"""
from peftplan.profile.nvml import GpuUnavailable
from peftplan.profile.store import Measurement, Settings

__all__ = ["GpuUnavailable", "Measurement", "Settings"]
