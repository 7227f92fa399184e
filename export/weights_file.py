"""The graph's external weights file (`model.onnx.data`), written while the graph is built: each weight goes
to disk as it is made and the graph keeps only a reference to it, so a float32 export holds its weights once
(in the PyTorch model) instead of twice.

The references are the ones `onnx.save_model(..., save_as_external_data=True)` writes (location, offset,
length; onnx/external_data_helper.py), so the file reads back like one that function wrote.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import numpy as np
from onnx import TensorProto, helper, numpy_helper

# tensors smaller than this stay inside model.onnx (onnx.save_model's default size_threshold)
SIZE_THRESHOLD = 1024


class WeightsFile:
    """An external data file being written: `initializer` appends a weight's bytes to it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle = open(path, "wb")  # noqa: SIM115 (closed by close() or the with block)

    def initializer(self, name: str, value: np.ndarray) -> TensorProto:
        """The initializer `name` of `value` (C-contiguous): a reference to its bytes, appended to the file
        straight from the array (a TensorProto holding them would keep its memory until it is freed whole);
        small values inline."""
        if value.nbytes < SIZE_THRESHOLD:
            return numpy_helper.from_array(value, name)
        offset = self.handle.tell()
        self.handle.write(value.data)
        tensor = TensorProto(
            name=name,
            data_type=helper.np_dtype_to_tensor_dtype(value.dtype),
            dims=value.shape,
            data_location=TensorProto.EXTERNAL,
        )
        for key, text in (("location", self.path.name), ("offset", str(offset)), ("length", str(value.nbytes))):
            tensor.external_data.add(key=key, value=text)
        return tensor

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> WeightsFile:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
