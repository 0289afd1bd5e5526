"""Net family ``module``: the team's own ``torch.nn.Module``, a class in a Python file of the
project (``architecture.file``, default ``model.py`` in projects/<app>/, made absolute when the
manifest loads), built with ``architecture.kwargs``.

The constructor contract: Kiln calls

    cls(in_channels=C, num_classes=K, input_size=(H, W), **kwargs)

with the dataset's channels, classes and (height, width); the module takes float32 NCHW
batches in [0, 1] of shape (N, C, H, W) and returns (N, K) logits (for a reconstruction
objective, its own output). To go through every stage it should trace with
``torch.fx.symbolic_trace`` and keep to Kiln's op vocabulary (kiln/nets/__init__.py); what TVM
cannot import is reported, naming the node, before training (kiln/nets/onnx.py ``preflight``).

Its counts are measured on the build (``estimate`` builds it, so it imports torch): the
manifest loader does not estimate it (``ModuleArchitecture.analytic`` is false) and the train
stage checks ``max_macs`` on the built model."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

from kiln.errors import ManifestError
from kiln.nets import Complexity


def load_class(arch):
    """The class ``arch.class_name`` of ``arch.file``; a ManifestError naming both when the file
    is missing, fails to import, or lacks the class."""
    path = Path(arch.file)
    where = f"architecture.file: {path}"
    if not path.is_file():
        raise ManifestError(f"{where}: no such file (expected a Python file defining class {arch.class_name}; "
                            "a relative path is relative to the project's directory)")
    # one module name per file, so two apps' model.py never shadow each other in sys.modules
    name = "kiln_user_model_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ManifestError(f"{where}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the team's code may raise anything while it imports
        sys.modules.pop(name, None)
        raise ManifestError(f"{where}: importing it failed: {type(e).__name__}: {e}") from e
    cls = getattr(module, arch.class_name, None)
    if cls is None:
        defined = sorted(k for k, v in vars(module).items() if isinstance(v, type) and v.__module__ == name)
        raise ManifestError(f"architecture.class_name: {path} has no class '{arch.class_name}' "
                            f"(it defines: {', '.join(defined) or 'no classes'})")
    return cls


def build(arch, in_ch: int, classes: int, image_size: tuple[int, int]):
    import torch.nn as nn

    cls = load_class(arch)
    where = f"architecture.class_name: {arch.class_name} in {arch.file}"
    try:
        model = cls(in_channels=in_ch, num_classes=classes, input_size=tuple(image_size), **arch.kwargs)
    except Exception as e:  # a constructor that does not take the contract's arguments, or fails
        raise ManifestError(f"{where}: {arch.class_name}(in_channels={in_ch}, num_classes={classes}, "
                            f"input_size={tuple(image_size)}, **architecture.kwargs {arch.kwargs}) failed: "
                            f"{type(e).__name__}: {e} (see kiln/nets/module.py for the constructor contract)") from e
    if not isinstance(model, nn.Module):
        raise ManifestError(f"{where}: built a {type(model).__name__}, expected a torch.nn.Module")
    return model


def estimate(arch, image_size: tuple[int, int], in_ch: int, classes: int) -> Complexity:
    """Measured on the build (imports torch: the train stage calls it, not the manifest loader)."""
    from kiln.nets import measure

    return measure(build(arch, in_ch, classes, image_size), (in_ch, *image_size))
