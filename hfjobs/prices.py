"""Flavors and hourly prices of HF Jobs: live from ``list_jobs_hardware`` or from the dated table shipped here.

``--dry-run`` never touches the network, so it prices a run from :data:`PRICE_TABLE` and says so, with the
table's date. The CPU and T4 prices follow the Hub pricing documentation, ``a100-large`` and ``h200`` are the
indicative prices of the kit's reference notes (shared/reference/hf_jobs_api.md, huggingface_hub 2.4.0); for
every other flavor the table has no price and the dry run says "unknown offline". A real submit always prices
from ``list_jobs_hardware`` (the Hub's own answer) and copies that entry into the attempt file.
"""
from __future__ import annotations

from typing import Any

from .errors import HFJobsError

__all__ = ["FLAVORS", "PRICE_TABLE", "PRICES_AS_OF", "hardware_summary", "offline_price", "live_price", "usd"]

PRICES_AS_OF = "2026-12-02"
PRICES_SOURCE = ("Hub pricing docs (CPU, T4) and indicative prices (a100-large, h200) quoted in the kit's "
                 "reference notes for huggingface_hub 2.4.0")
#: Every flavor ``hf jobs run --flavor`` accepts (huggingface_hub 2.4.0 ``JobHardware``).
FLAVORS = ("cpu-basic", "cpu-upgrade", "cpu-performance", "cpu-xl", "t4-small", "t4-medium", "l4x1", "l4x4",
           "l40sx1", "l40sx4", "l40sx8", "a10g-small", "a10g-large", "a10g-largex2", "a10g-largex4", "a100-large",
           "a100x4", "a100x8", "h200", "h200x2", "h200x4", "h200x8", "rtx-pro-6000", "rtx-pro-6000x2",
           "rtx-pro-6000x4", "rtx-pro-6000x8")
#: flavor -> (pretty name, vCPU, RAM, accelerator (model, count, vram) or None, USD per hour)
PRICE_TABLE: dict[str, tuple[str, str, str, tuple[str, str, str] | None, float]] = {
    "cpu-basic": ("CPU Basic", "2 vCPU", "16 GB", None, 0.01),
    "cpu-upgrade": ("CPU Upgrade", "8 vCPU", "32 GB", None, 0.03),
    "cpu-xl": ("CPU XL", "16 vCPU", "124 GB", None, 1.00),
    "cpu-performance": ("CPU Performance", "32 vCPU", "256 GB", None, 1.90),
    "t4-small": ("Nvidia T4 - small", "4 vCPU", "15 GB", ("T4", "1", "16 GB"), 0.40),
    "t4-medium": ("Nvidia T4 - medium", "8 vCPU", "30 GB", ("T4", "1", "16 GB"), 0.60),
    "a100-large": ("Nvidia A100 - large", "12 vCPU", "142 GB", ("A100", "1", "80 GB"), 2.50),
    "h200": ("Nvidia H200", "23 vCPU", "256 GB", ("H200", "1", "141 GB"), 5.00),
}


def usd(x: float) -> str:
    """Dollars with cents, or with four significant digits below a cent."""
    return f"${x:.2f}" if x >= 0.01 or x == 0 else f"${x:.4g}"


def hardware_summary(hw: Any) -> dict:
    """A ``JobHardwareInfo`` as a plain dict, with the price per hour derived from its unit."""
    per_hour = {"second": 3600.0, "minute": 60.0, "hour": 1.0}.get(str(hw.unit_label).lower())
    if per_hour is None:
        raise HFJobsError(f"hardware {hw.name}: unknown price unit {hw.unit_label!r}")
    acc = hw.accelerator
    return {"name": hw.name, "pretty_name": hw.pretty_name, "cpu": hw.cpu, "ram": hw.ram,
            "accelerator": None if acc is None else {"model": acc.model, "quantity": acc.quantity, "vram": acc.vram,
                                                      "manufacturer": acc.manufacturer},
            "unit_cost_usd": hw.unit_cost_usd, "unit_label": hw.unit_label,
            "usd_per_hour": round(hw.unit_cost_usd * per_hour, 6), "source": "list_jobs_hardware"}


def _check_flavor(flavor: str, offered: list[str]) -> None:
    if flavor not in offered:
        raise HFJobsError(f"--flavor {flavor!r} is not offered; choose one of {', '.join(sorted(offered))} "
                          "(`hf jobs hardware` lists them with prices)")


def _worst(summary: dict, timeout_s: int, n_jobs: int, attempts: int) -> dict[str, Any]:
    rate = summary["usd_per_hour"]
    worst = None if rate is None else round(rate * timeout_s / 3600 * n_jobs * attempts, 4)
    return {"hardware": summary, "timeout_s": timeout_s, "jobs": n_jobs, "attempts": attempts,
            "worst_case_usd": worst}


def offline_price(flavor: str, timeout_s: int, n_jobs: int = 1, attempts: int = 1) -> dict[str, Any]:
    """The price from the shipped table (no network); ``usd_per_hour`` None when the table has none."""
    _check_flavor(flavor, list(FLAVORS))
    row = PRICE_TABLE.get(flavor)
    if row is None:
        summary = {"name": flavor, "pretty_name": flavor, "cpu": "?", "ram": "?", "accelerator": None,
                   "usd_per_hour": None}
    else:
        pretty, cpu, ram, acc, rate = row
        summary = {"name": flavor, "pretty_name": pretty, "cpu": cpu, "ram": ram,
                   "accelerator": None if acc is None else {"model": acc[0], "quantity": acc[1], "vram": acc[2]},
                   "usd_per_hour": rate}
    summary["source"] = f"price table shipped with the kit, as of {PRICES_AS_OF} ({PRICES_SOURCE})"
    return _worst(summary, timeout_s, n_jobs, attempts)


def live_price(api: Any, flavor: str, timeout_s: int, n_jobs: int = 1, attempts: int = 1) -> dict[str, Any]:
    """The flavor's entry from ``list_jobs_hardware`` and the worst case of ``n_jobs`` x ``attempts``."""
    from .retry import with_retry

    hw = {h.name: h for h in with_retry(api.list_jobs_hardware, what="list_jobs_hardware")}
    _check_flavor(flavor, list(hw))
    return _worst(hardware_summary(hw[flavor]), timeout_s, n_jobs, attempts)


def price_lines(p: dict[str, Any]) -> list[str]:
    """Flavor, hourly price, timeout and worst case as display lines."""
    hw = p["hardware"]
    acc = hw["accelerator"]
    kit = f"{hw['cpu']}, {hw['ram']}" + (f", {acc['quantity']}x {acc['model']} ({acc['vram']})" if acc else "")
    jobs = f" x {p['jobs']} jobs" if p["jobs"] > 1 else ""
    att = f" x {p['attempts']} attempts" if p.get("attempts", 1) > 1 else ""
    rate = "unknown offline (see `hf jobs hardware`)" if hw["usd_per_hour"] is None else f"{usd(hw['usd_per_hour'])}/hour"
    worst = "unknown" if p["worst_case_usd"] is None else usd(p["worst_case_usd"])
    lines = [f"flavor      {hw['name']} ({hw['pretty_name']}: {kit})", f"price       {rate}",
             f"timeout     {p['timeout_s']} s",
             f"worst case  {worst} (every job running until its timeout{jobs}{att})"]
    if hw.get("source", "").startswith("price table"):
        lines.append(f"prices      from the {hw['source']}; not asked from the Hub (--dry-run works offline)")
    return lines
