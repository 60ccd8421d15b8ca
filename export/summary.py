"""The summary ``mobile-vmoe export`` prints of a verified artifact (from its sidecar)."""

from __future__ import annotations

from pathlib import Path

from mobile_vmoe.files.sidecar import Sidecar

from . import pte

__all__ = ["print_summary"]


def print_summary(out: Path, sc: Sidecar) -> None:
    rt, r = sc.routing, sc.details
    kind = f"MoE E={rt['E']} K={rt['K']} L={rt['L']}" if rt else "dense"
    if sc.kind != "classifier":
        kind += f", {sc.kind.replace('_', ' ')}"
    weights = "RANDOM weights" if sc.random_weights else "trained weights"
    print(
        f"wrote {out} ({(sc.file_size_bytes or 0) / 1e6:.2f} MB): {sc.model} [{kind}], {sc.precision}, {weights}"
    )
    p = r["parity"]
    if "max_abs_diff" in p:
        thr = []
        if p["atol"] is not None:
            thr.append(f"atol {p['atol']:g}")
        if p["min_top1_agreement"] is not None:
            thr.append(f"min agreement {p['min_top1_agreement']:.0%}")
        print(
            f"  parity vs eager on {p['n_images']} {'texts' if sc.takes_tokens else 'images'}: max abs diff "
            f"{p['max_abs_diff']:.3g}, {'retrieval' if sc.takes_tokens else 'top-1'} agreement {p['top1_agreement']:.2%} (checked: {', '.join(thr) or 'not enforced, random weights'})"
        )
    else:
        print(f"  parity: {p['status']}")
    if "delegation" in r:
        d = r["delegation"]
        print(
            f"  XNNPACK: {sum(d['delegated_ops'].values())} ops in {d['num_delegated_subgraphs']} subgraphs"
        )
        port = ", ".join(f"{pte.clean_op_name(k)} x{v}" for k, v in d["portable_ops"].items())
        print(f"  portable kernels: {port or 'none'}")
    if "mil_structure" in r:
        s = r["mil_structure"]
        if "moe" in s:
            m = s["moe"]
            print(
                f"  MIL: {m['matmul_ops']} matmul/linear ops (dense twin {s['dense_twin_matmul_ops']}), "
                f"{len(m['expert_weight_gathers'])} gathers on stacked expert weights"
            )
        else:
            print(f"  MIL: {s['dense']['matmul_ops']} matmul/linear ops")
    print(f"  sidecar: {out.name}.json")
