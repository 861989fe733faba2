"""Reading safetensors checkpoints into a model, one tensor at a time.

Used by `ViT.from_pretrained`, `LLM.from_pretrained` (Hugging Face layout: `config.json` plus
`model.safetensors` or sharded `model-0000k-of-0000n.safetensors` with an index) and by
`SparseCut.from_pretrained`. The model is built on the meta device, so it holds no memory until
each tensor is read, cast and put in place: peak memory stays near one copy of the weights.
Safetensors and JSON only; nothing here unpickles.
"""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager

import torch
import torch.nn as nn


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what is wrong and what to do."""


def read_config(path):
    config_file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"{path} has no config.json: is it a checkpoint directory?")
    try:
        with open(config_file) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_file} is not valid JSON ({error})") from None


def safetensors_files(path):
    """The weight files of a directory: model.safetensors, or the shards its index lists."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, shard) for shard in shards]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise CheckpointError(f"{path}: shards listed in the index are missing: {missing}")
        return files
    raise CheckpointError(f"{path} has no model.safetensors (nor a sharded index): "
                          "only safetensors checkpoints are read")


def set_tensor(model, name, tensor):
    """Put a tensor in place of the (meta) parameter or buffer called name."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:                               # keep frozen parts frozen
        trainable = module._parameters[leaf].requires_grad and tensor.is_floating_point()
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=trainable)
    else:
        module._buffers[leaf] = tensor


def load_weights(cls, config, path, key_map=lambda name: name, dtype=torch.float32, device="cpu"):
    """Build cls(config) on the meta device and fill it from the safetensors files under path."""
    with torch.device("meta"):
        model = cls(config)
    return fill_weights(model, path, key_map, dtype, device)


def fill_weights(model, path, key_map=lambda name: name, dtype=torch.float32, device="cpu",
                 optional_prefixes=()):
    """Replace model's tensors by those in the safetensors files under path, one at a time.

    key_map maps a file's tensor name to the model's, or to None for tensors the model does not
    use. A part under one of optional_prefixes may be absent as a whole (it comes from
    elsewhere, e.g. a frozen backbone's own directory); a part that is present must be whole.
    Missing, unexpected and mis-shaped tensors are reported together in one CheckpointError.
    """
    from safetensors import SafetensorError, safe_open

    expected = {name: t.shape for name, t in model.state_dict().items()}
    config = model.config
    tied = getattr(config, "tie_embeddings", False) or getattr(getattr(config, "llm", None),
                                                                "tie_embeddings", False)
    tied_head = [name for name in expected if name.endswith("lm_head.weight")] if tied else []
    loaded, unexpected, mis_shaped, non_finite = set(), [], [], []
    for file in safetensors_files(path):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    name = key_map(key)
                    if name is None or name in tied_head:
                        continue
                    if name not in expected:
                        unexpected.append(key)
                        continue
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != tuple(expected[name]):
                        mis_shaped.append(f"{key} {shape} (model: {tuple(expected[name])})")
                        loaded.add(name)                         # reported as mis-shaped only
                        continue
                    tensor = f.get_tensor(key)
                    if tensor.is_floating_point() and not torch.isfinite(tensor.sum()):  # no copy
                        non_finite.append(key)
                        continue
                    # A copy in torch's own (64-byte aligned) memory, as a new model's, not a
                    # view of the file's buffer (32 bytes off), so that no kernel's path depends
                    # on where the file's header ended (README, "When something goes wrong").
                    set_tensor(model, name, tensor.to(device=device, dtype=dtype, copy=True))
                    loaded.add(name)
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{file} is not a readable safetensors file ({error}); "
                                  "it may be truncated: download or save it again") from None
    if non_finite:
        raise CheckpointError(f"{path}: tensors with NaN or infinite values: {non_finite}; the run "
                              "that wrote them diverged: use an earlier checkpoint")
    absent = tuple(p for p in optional_prefixes if not any(n.startswith(p) for n in loaded))
    missing = sorted(n for n in set(expected) - loaded - set(tied_head) if not n.startswith(absent))
    if missing or unexpected or mis_shaped:
        problems = [f"missing: {missing}" if missing else "",
                    f"unexpected: {unexpected}" if unexpected else "",
                    f"wrong shape: {mis_shaped}" if mis_shaped else ""]
        raise CheckpointError(f"{path} does not match the model config: "
                              + "; ".join(p for p in problems if p))
    for name in tied_head:                     # re-tie the output head to its embedding
        head = name.rpartition(".")[0]
        model.get_submodule(head).weight = model.get_submodule(head.replace("lm_head", "embed_tokens")).weight
    return model.eval()


COMPLETE = ".complete"             # written last into a new checkpoint, before it is swapped in


@contextmanager
def atomic_directory(out_dir):
    """Yield a temporary directory beside out_dir; on success it replaces out_dir by renames.

    At every instant a whole checkpoint can be found: while the new one is written, out_dir is
    untouched; between the two renames (out_dir -> out_dir.old-*, then out_dir.tmp-* -> out_dir),
    the new one is complete (it holds COMPLETE) and `recover` puts it in place. Leftovers of an
    earlier crash are removed before the next write."""
    out_dir = os.path.abspath(out_dir)
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    recover(out_dir)
    tmp = tempfile.mkdtemp(prefix=name + ".tmp-", dir=parent)
    try:
        yield tmp
        open(os.path.join(tmp, COMPLETE), "w").close()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=name + ".old-", dir=parent)   # renamed over, being empty
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover(out_dir):
    """Finish a swap that a crash interrupted and remove its leftovers. Without out_dir, the new
    checkpoint (a tmp that is complete) is put in place, else the previous one (an old: it was
    whole when it was moved aside)."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        return
    leftover = lambda kind: sorted(os.path.join(parent, f) for f in os.listdir(parent)
                                   if f.startswith(f"{name}.{kind}-"))
    leftovers = leftover("tmp") + leftover("old")
    if not os.path.exists(out_dir):
        new = [d for d in leftover("tmp") if os.path.isfile(os.path.join(d, COMPLETE))]
        old = [d for d in leftover("old") if os.listdir(d)]
        if new or old:
            try:
                os.rename((new or old)[0], out_dir)
            except OSError:                       # another process (rank) recovered it first
                if not os.path.exists(out_dir):
                    raise
    for directory in leftovers:
        if os.path.exists(directory):
            shutil.rmtree(directory, ignore_errors=True)


def checkpoint_dir(path):
    """A checkpoint directory, or a training out_dir holding one in checkpoint/ (recovered if a
    crash interrupted its last swap)."""
    nested = os.path.join(path, "checkpoint")
    if not os.path.isfile(os.path.join(path, "config.json")):
        recover(nested)
        if os.path.isdir(nested):
            return nested
    return path


def version_1_names(fusion):
    """Tensor names of config version 1 -> ours: the fusers and gates were at the top level, and
    the baselines' projector was wrapped in one more module."""
    def rename(name):
        if not name.startswith(("fusers.", "gates.")):
            return name
        if fusion in ("llava", "concat"):
            name = name.replace(".projector.", ".", 1)
        return "fusion." + name
    return rename
