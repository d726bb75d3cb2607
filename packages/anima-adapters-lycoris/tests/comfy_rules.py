"""ComfyUI's LoRA/LoKr/LoHa/DoRA rules, restated from the reference (anima-model.md §3.1 and ComfyUI's
``comfy/weight_adapter/{lora,lokr,loha,base}.py``) independently of the plugin's own loader, so the tests compare
our forward against the formula, not against our code."""

import torch


def comfy_key_map(checkpoint_keys):
    """ComfyUI's generic unet map: ``diffusion_model.<path>.weight`` is reachable as ``lora_unet_<path, . → _>``."""
    out = {}
    for key in checkpoint_keys:
        path = key.removeprefix("net.")
        if path.endswith(".weight"):
            path = path[: -len(".weight")]
            out["lora_unet_" + path.replace(".", "_")] = path
    return out


def comfy_delta(parts, weight):
    """ΔW ComfyUI adds at strength 1 for one module's tensors ``parts`` (suffix → tensor) over base ``weight``."""
    p = {k: v.double() for k, v in parts.items()}
    alpha = float(p["alpha"]) if "alpha" in p else None
    if any(k.startswith("lokr_") for k in p):
        dim = None
        if "lokr_w1" in p:
            w1 = p["lokr_w1"]
        else:
            dim = p["lokr_w1_b"].shape[0]
            w1 = p["lokr_w1_a"] @ p["lokr_w1_b"]
        if "lokr_w2" in p:
            w2 = p["lokr_w2"]
        else:
            dim = p["lokr_w2_b"].shape[0]
            w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
        diff = torch.kron(w1, w2)
        scale = alpha / dim if alpha is not None and dim is not None else 1.0  # both factors full: 1
    elif any(k.startswith("hada_") for k in p):
        diff = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
        scale = alpha / p["hada_w1_b"].shape[0] if alpha is not None else 1.0
    else:
        down, up = p["lora_down.weight"], p["lora_up.weight"]
        diff = up @ down
        scale = alpha / down.shape[0] if alpha is not None else 1.0
    if "dora_scale" not in p:
        return diff * scale
    w = weight.double()
    calc = w + diff * scale
    if p["dora_scale"].shape[0] == w.shape[0]:
        norm = w.norm(dim=1, keepdim=True)  # ComfyUI normalises the original weight on the output axis
    else:
        norm = calc.transpose(0, 1).norm(dim=1, keepdim=True).transpose(0, 1)
    return calc * (p["dora_scale"] / (norm + torch.finfo(torch.float32).eps)) - w
