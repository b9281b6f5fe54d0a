"""Run by .venv-kaggle-cli's Python: push rendered kernels and create the code dataset with the
real Kaggle CLI (its validation and request building), every HTTP call cut off.

Usage: python _kaggle_cli_push.py KERNEL_FOLDER... --dataset CODE_FOLDER
Prints one JSON object: what each call would have sent, and what the CLI printed.
"""

import contextlib
import io
import json
import os
import sys
from unittest import mock

from kaggle.api.kaggle_api_extended import KaggleApi
from requests.exceptions import HTTPError


def fake_client(sent: list) -> mock.MagicMock:
    """A Kaggle client that records each request instead of sending it."""
    client = mock.MagicMock()
    client.__enter__.return_value = client

    def record(request):
        sent.append({k: getattr(request, k, None) for k in FIELDS})
        return mock.MagicMock(error="", ref="ok", url="https://www.kaggle.com/ok")

    client.kernels.kernels_api_client.save_kernel.side_effect = record
    client.datasets.dataset_api_client.create_dataset.side_effect = record
    return client


FIELDS = [
    "slug",
    "new_title",
    "machine_shape",
    "enable_gpu",
    "enable_tpu",
    "enable_internet",
    "dataset_data_sources",
    "kernel_data_sources",
    "model_data_sources",
    "title",
    "license_name",
    "files",
]


def main(argv: list[str]) -> None:
    """Push each kernel folder, then create the dataset; print the result as JSON."""
    split = argv.index("--dataset")
    kernels, dataset = argv[:split], argv[split + 1]
    api = KaggleApi()
    api.authenticate()
    sent, uploaded, printed = [], [], io.StringIO()
    api.build_kaggle_client = lambda: fake_client(sent)
    api.dataset_status = mock.Mock(side_effect=HTTPError("404"))
    api._upload_blob = lambda path, *a, **k: uploaded.append(os.path.basename(path)) or "token"
    with contextlib.redirect_stdout(printed):
        for folder in kernels:
            api.kernels_push(folder, None, None)
        api.dataset_create_new(dataset, quiet=True, dir_mode="zip")
    for request in sent:
        request["files"] = len(request["files"] or [])
    print(
        json.dumps({"sent": sent, "uploaded": uploaded, "printed": printed.getvalue()}, default=str)
    )


if __name__ == "__main__":
    main(sys.argv[1:])
