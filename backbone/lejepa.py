"""Encoders pretrained by the LeJEPA job, as frozen backbones.

:func:`encoder_backbone` wraps any encoder state of the job's timm architecture (a checkpoint, or the random
initialisation it started from) in a :class:`FrozenBackbone`, so that probes read embeddings and patch tokens
through the same preprocessing and extraction code as every registered backbone.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from .frozen import FrozenBackbone, attach_source
from .registry import BackboneSpec

__all__ = ["encoder_spec", "encoder_backbone", "render_card"]


def encoder_spec(encoder: Mapping[str, Any], *, name: str, mean: Sequence[float], std: Sequence[float],
                 notes: str = "") -> BackboneSpec:
    """An (unregistered) spec for the timm ViT described by the job's ``encoder`` parameters."""
    from ..arch.lejepa import build_encoder

    def builder(*, spec: BackboneSpec, weights: Any = None) -> torch.nn.Module:
        return build_encoder(encoder, init_seed=0)

    return BackboneSpec(name=name, library="timm", hub_id=None, revision=None, image_size=int(encoder["img_size"]),
                        patch_size=int(encoder["patch_size"]), depth=int(encoder["depth"]),
                        width=int(encoder["embed_dim"]), num_prefix_tokens=1, num_registers=0,
                        mean=tuple(float(x) for x in mean), std=tuple(float(x) for x in std), builder=builder,
                        modality="any", notes=notes or f"timm {encoder['timm_model']} trained by LeJEPA (covtoken G8)")


def encoder_backbone(encoder: Mapping[str, Any], state: Mapping[str, torch.Tensor] | None, *, name: str,
                     init_seed: int, mean: Sequence[float], std: Sequence[float], origin: str,
                     device: str = "cpu") -> FrozenBackbone:
    """A frozen backbone of the job's architecture with ``state`` loaded strictly (``None``: the random init).

    Args:
        encoder: timm model name and kwargs (the locked ``pretraining.encoder``).
        state: encoder weights (timm keys), e.g. from ``covtoken.arch.pretrain.encoder_state_from_checkpoint``.
        name: the name recorded in provenance (``lejepa-step000150``, ``lejepa-random-init``...).
        init_seed: the initialisation seed (used when ``state`` is None).
        origin: where the weights come from, recorded as the source origin.
    """
    from ..arch.lejepa import build_encoder

    model = build_encoder(encoder, init_seed=init_seed)
    if state is not None:
        model.load_state_dict(dict(state), strict=True)
    attach_source(model, origin=origin, resolved_revision=None)
    return FrozenBackbone(encoder_spec(encoder, name=name, mean=mean, std=std), model, device=device)


def _encoder_line(P: Mapping[str, Any]) -> str:
    """The encoder in words: timm's 2-D ViT (``encoder``) or MONAI's 3-D ViT (``vit``, ``input_size``)."""
    if "encoder" in P:
        e = P["encoder"]
        return (f"timm `{e['timm_model']}` ({e['depth']} blocks, width {e['embed_dim']}, {e['img_size']} px, patch "
                f"{e['patch_size']})")
    v = P["vit"]
    return (f"MONAI `ViT` (spatial_dims=3; {v['num_layers']} blocks, width {v['hidden_size']}, input "
            f"{'x'.join(map(str, P['input_size']))}, patch {'x'.join(map(str, P['patch_size']))})")


def _views_line(P: Mapping[str, Any]) -> str:
    if "global_views" in P:
        return (f"{P['global_views']} global ({P['global_size']} px) + {P['local_views']} local ({P['local_size']} px) "
                "views")
    return f"{P['views']} random volumetric crops per volume (scale {P['crop_scale'][0]}-{P['crop_scale'][1]} per axis)"


def render_card(record: Mapping[str, Any], pretraining: Mapping[str, Any], *, name: str, weights_file: str,
                weights_sha256: str) -> str:
    """Markdown model card of a LeJEPA-pretrained encoder, from its G8 record and ``pretraining.json`` artefact."""
    prov = record["provenance"]
    ds = prov["dataset"]
    P = prov["parameters"]["pretraining"]
    chosen = next((n for n in record["notes"] if n.startswith("checkpoint ")), "")
    unit = "volumes" if "volumes_fed" in pretraining else "images"
    fed = pretraining[f"{unit}_fed"]
    tier = record.get("evidence", "flow-check")
    tier_line = ("flow check. It learned from synthetic phantoms: nothing here says how it behaves on real images."
                 if tier == "flow-check" else f"{tier} (from the record's facts; see the record's `evidence`).")
    mon = "\n".join(f"| {c['step']} | {c['monitor']['sigreg_projected']:.2f} | {c['monitor']['rankme_embedding']:.2f} | "
                    f"{c['monitor']['per_dim_std']['min']:.3f} / {c['monitor']['per_dim_std']['median']:.3f} |"
                    for c in pretraining["checkpoints"])
    rows = "\n".join(f"| `{k}` | {m['value']:.4f} | "
                     + (f"[{m['ci'][0]:.4f}, {m['ci'][1]:.4f}]" if m.get("ci") else "n/a") + " |"
                     for k, m in sorted(record["metrics"].items()) if m.get("value") is not None)
    crit = "\n".join(f"- {c['id']}: `{c['metric']}` ({c['judged_on']}) {c['comparator']} {c['threshold']} -> "
                     f"**{c['outcome']}**" for c in record["criteria"])
    return f"""# {name}

Generated from gate record `{record['run_id']}` (G8, decision **{record['decision']}**, lock entry
`{record['lock']['entry']}`, code commit `{prov['code']['commit']}`{' (dirty)' if prov['code']['dirty'] else ''}).

- **What it is:** {_encoder_line(P)}, pretrained from its fixed-seed
  initialisation (seed {P['init_seed']}) with LeJEPA: lam = {P['lam']}, {P['num_slices']} SIGReg slices (Epps-Pulley,
  t in [0, {P['t_max']}], {P['knots']} knots), {_views_line(P)}, {P['steps']} steps of batch {P['batch_size']},
  AdamW lr {P['lr']}.
- **Data:** `{ds.get('id')}` @ `{ds.get('revision')}`, training patients only
  ({fed['n']} {unit}, ids sha256 `{fed['sha256'][:16]}...`).
- **Checkpoint:** {chosen}
- **Weights:** `{weights_file}`, sha256 `{weights_sha256}`.
- **Evidence tier:** {tier_line}

## Collapse monitor (clean training {unit})

| step | SIGReg (projected) | RankMe (embedding) | per-dim std min / median |
|---|---|---|---|
{mon}

## Test metrics (patients as clusters; 95% CIs)

| metric | value | CI |
|---|---|---|
{rows}

## Criteria

{crit}

## Caveats

- Research artefact; not a medical device.
- Pretraining ran {pretraining['seconds_this_attempt']:.0f} s in the run that wrote the record; the shared CPU was busy,
  so read the time as an upper bound.
"""
