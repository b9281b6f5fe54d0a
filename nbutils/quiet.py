"""Clean notebook outputs: the frameworks' start-up chatter is filtered here, in one place.

TensorFlow (keras-hub's tokenizers), XLA and SentencePiece write log lines from C++ straight to the
process's stderr, which Jupyter shows in the cell. :func:`native_stderr_filtered` routes that file
descriptor through a filter while they load and passes on every line except the known, harmless ones
below, so a real error still shows. Python warnings a reader can do nothing about are filtered by
message.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import warnings

# each alternative matches a whole line's start; the rest of the line is free text
NATIVE_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} .*(port\.cc|cudart_stub\.cc|cpu_feature_guard\.cc|dso_loader\.cc|cuda_\w+\.cc):\d+\]"
    r"|E\d{4} .*cuda_(platform|executor|diagnostics)\.cc:\d+\] .*(cuInit|CUDA|kernel driver)"
    # TensorFlow and JAX both loaded
    r"|E\d{4} .*cuda_(dnn|blas|fft)\.cc:\d+\] Unable to register cu\w+ factory"
    r"|W\d{4} .*computation_placer\.cc:\d+\] computation placer already registered"
    r"|normalizer\.cc\(\d+\) LOG\(INFO\) precompiled_charsmap is empty"
    r"|To enable the following instructions: .*rebuild TensorFlow"
    r"|\s*$"
)
WARNING_NOISE = (
    "IProgress not found",  # tqdm without ipywidgets: it falls back to a text bar
    # a multimodal Gemma 4's vision pooling over the empty image batch of a text row
    r"You are using a softmax over axis -1 of a tensor of shape \(0,",
)


def is_noise(line: str) -> bool:
    """Whether a native log line is known, harmless start-up chatter."""
    return bool(NATIVE_NOISE.match(line))


@contextlib.contextmanager
def native_stderr_filtered():
    """Route file descriptor 2 through a filter while the block runs: every line that is not known
    noise is passed on at once (so the last words of a native crash still show)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (some embedded interpreters): nothing to filter
        yield
        return
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)

    def forward() -> None:
        with os.fdopen(read_fd, "rb") as pipe:
            for raw in pipe:
                if not is_noise(raw.decode("utf-8", "replace").rstrip("\r\n")):
                    os.write(saved, raw)

    thread = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        os.dup2(saved, 2)  # closes the pipe's last write end: the thread reads to the end and stops
        thread.join(timeout=5)
        os.close(saved)


def load_frameworks() -> None:
    """Import JAX, Keras and keras-hub (hence TensorFlow) with their start-up chatter filtered
    out."""
    for message in WARNING_NOISE:
        warnings.filterwarnings("ignore", message=f".*{message}")
    with native_stderr_filtered():
        import jax  # noqa: F401
        import keras  # noqa: F401
        import keras_hub  # noqa: F401
