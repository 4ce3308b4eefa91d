"""The deployable forms of a fast model (CRATE or CRATE-α), each a callable images -> outputs.

    torch.fx.symbolic_trace(model)                          "fx"
    torch.jit.script(model)                                 "script"
    torch.jit.script(torch.fx.symbolic_trace(model))        "fx+script"
    torch.export.export, the batch dimension dynamic        "export"
    ONNX by the dynamo exporter, run in onnxruntime         "onnx"   (pip install onnx onnxscript onnxruntime)

The traced forms keep the eager model's input check (crate.models.model.checked_images is a torch.fx leaf and
scriptable) and its attention choice at run time (crate.models.layers.subspace_attention); export and ONNX
record the path taken while exporting: under autograd, the explicit one. tests/test_deployment.py
proves each form equal to eager within float32's own error; benchmarks/deployment.py measures it.
"""

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def scripted(model: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # deprecated in favour of torch.export, still what many deploy
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        return torch.jit.script(model)


def exported(model: nn.Module, images: torch.Tensor) -> torch.export.ExportedProgram:
    """torch.export of model(images) with the batch dimension dynamic (any size from 1)."""
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(model, (images,), dynamic_shapes=({0: batch},))


def onnx_file(model: nn.Module, images: torch.Tensor, path: str | Path) -> Path:
    """ONNX by the dynamo exporter (torch.export underneath), batch dimension dynamic, saved to path."""
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        program = torch.onnx.export(
            model, (images,), dynamo=True, dynamic_shapes=({0: batch},), verbose=False
        )
    program.save(str(path))
    return Path(path)


def onnx_runner(path: str | Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ONNX model at path run by onnxruntime on the CPU, tensors in and out."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]

    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: images.numpy()})[0])

    return run


def fx_scripted(model: nn.Module) -> torch.jit.ScriptModule:
    return scripted(torch.fx.symbolic_trace(model))


def onnx_runtime(model: nn.Module, images: torch.Tensor, folder: str | Path) -> Callable:
    return onnx_runner(onnx_file(model, images, Path(folder) / "model.onnx"))


# name: build(model, example images, folder for files) -> a callable images -> outputs
FORMS: dict[str, Callable[[nn.Module, torch.Tensor, Path], Callable]] = {
    "fx": lambda model, images, folder: torch.fx.symbolic_trace(model),
    "script": lambda model, images, folder: scripted(model),
    "fx+script": lambda model, images, folder: fx_scripted(model),
    "export": lambda model, images, folder: exported(model, images).module(),
    "onnx": onnx_runtime,
}
