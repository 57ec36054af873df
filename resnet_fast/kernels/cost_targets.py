"""The cost report's targets (:func:`target_problems`) and why a ResNet-50 spec misses one (:func:`reasons`).

Issue 14's rule for a target Triton does not reach: name the spec, its figure and why, and run the cuDNN
composite there by default. The default holds for every conv: with nothing measured for a key,
:func:`.autotune.impl_heuristic` picks the cuDNN composite; on the GPU the chooser times the Triton kernels, the
composite and ``triton_dy_pass`` per conv and keeps the fastest. This module gives each miss its reason:

* ``loop`` (issue ratio): the GEMM loop misses even without an operand transform (``transform_free_ratio``,
  :func:`.cost_report.transform_free`, or the ratio of a loop without one), at the tiles the layer allows;
* ``transform`` (issue ratio): the loop's operand transform adds to the ratio (the ratio less the
  transform-free one); with ``loop`` absent, the transform alone puts it over;
* ``vectors`` (scalar loads): the narrow cp.async in the loop are exactly the per-channel fp32 vectors it reads
  each step (``loop_vectors``), and no other load is narrow;
* ``unexplained``: anything else (a spill, a tile not in flight, a narrow load beyond the vectors, an issue miss
  without the transform-free figure). :func:`unexplained` lists them; the tests require none.

:func:`render` writes ``docs/COST_MISSES.md`` from the committed baseline's records (the reasons, with the
arguments of :data:`WHY`), so the document changes exactly when the baseline does.
"""
from __future__ import annotations


def record_id(r: dict) -> str:
    return f"{r['layer']}|{r['role']}|{r['kernel']}|{r['variant']}"


def compute_bound(r: dict) -> bool:
    """3×3 convs of at least 128 channels (the target's compute-bound class), from the layer's shape name."""
    return r.get("shape_k", 0) == 3 and r.get("shape_c", 0) >= 128


def issue_target(r: dict) -> float:
    """The issue-to-MMA ratio a record must not exceed: 0.6 compute-bound, 0.8 else."""
    return 0.6 if compute_bound(r) else 0.8


def target_problems(records: list) -> list:
    """The targets each record misses (issue ratio ≤ 0.6 compute-bound / 0.8 else, ≥ 2 tiles in flight, 0 spills,
    no scalar loads in the main loop outside the stem -- LDG of <= 4 bytes or a 4/8-byte cp.async, e.g. per-channel
    vectors or dgrad's tap table reloaded every step; the stem's training backward ≤ 2× its forward)."""
    out = []
    for r in records:
        lim = issue_target(r)
        miss = []
        if r["issue_ratio"] > lim:
            miss.append(f"issue_ratio {r['issue_ratio']} > {lim}")
        if r["tiles_in_flight"] < 2:
            miss.append(f"tiles_in_flight {r['tiles_in_flight']} < 2")
        if r["spills"]:
            miss.append(f"spills {r['spills']}")
        scalar = r["loads"]["ldg_scalar"] + r["loads"].get("ldgsts_narrow", 0)
        if r["layer"] != "stem" and scalar:
            miss.append(f"{scalar} scalar loads in the loop")
        if miss:
            out.append((r, miss))
    return out


def issue_lost_us(r: dict) -> float:
    """What the issue rate costs a record beyond its MMA and memory time (est, µs per launch; <= 0: nothing)."""
    return (r["issue_us"] - max(r["mma_us"], r["memory_us"])) / r["tail_efficiency"]


# Why Triton does not reach the target, per reason (and per kernel for ``loop``). Figures from the sm_90 SASS.
WHY = {
    "transform": (
        "The loop forms this operand while loading it (dgrad: `dy = c1·dz + c2·(y − mean) + c3` or the ReLU mask; "
        "wgrad: the same for dy, and x's BN+ReLU; forward: x's BN+ReLU). That costs c instructions per formed "
        "element per lane: bf16 unpack of the operand and of y, the fp32 FADD and FFMAs, the padding select, the "
        "repack (c ≈ 10 for dgrad's `dy_bn`, ≈ 3.5 for the ReLU mask). Each formed element feeds the W MMA columns "
        "of the tile's other side, so the transform adds ≈ 16·c/W to the ratio whatever the code generator, and W "
        "is capped by the layer's channels and the registers of the fp32 accumulator. The math stays fp32 because "
        "packed bf16 would cancel in `y − mean` (the float64 tests' large-mean cases). The forms without the "
        "transform exist: `triton_dy_pass` (rows `+dy_pass`) and the prologue pass (configs `-pp`)."),
    "loop": {
        "fwd": "The stem has 3 channels: dense taps, 4 per tap in a 32-wide row, whose per-row coordinates and "
               "padding masks every warp issues each step. (The 3×3 convs whose output blocks tile exactly take "
               "the TMA-box kernel, `-tma` configs: layer1's 64 channels at 0.75.)",
        "dgrad": "Stride-1 dgrad takes the TMA-box kernel where its pixel blocks tile dx exactly or a 1×1 conv "
                 "runs over flat pixel rows (`-tma`; layer1's 64-channel loop 0.72–0.78, was 0.93–1.09). Elsewhere "
                 "dy is gathered per tap of the stride phase with a padding mask per row. At 28² (layer2's 3×3, "
                 "target 0.6) the gather's 64×128 loop is at 0.62; the box tile's is 0.44 but its 64-pixel "
                 "blocks pad the map by 14 % (28 = 7·4): a tuning candidate, not the default.",
        "wgrad": "Where the box kernel does not run, x is an im2col gather: a coordinate and padding mask per "
                 "row and tap. It runs 3×3 filters at stride 1 and, by stride-phase views, 2 where a tile fits, "
                 "and 1×1 convs at stride 1 over flat pixel rows (layer1's 64 channels 0.39 plain). At stride 2 "
                 "and 128 channels (layer2.0.conv2) its 128×128 tile runs the training variant (2.37, loop 0.47; "
                 "the gather 2.99) and the prologue-only form (+dy_pass, 1.40, loop 0.47; the cp.async tile 1.86, "
                 "loop 0.88); inference keeps the cp.async row-taps tile (1.49, loop 0.89): the box is 1.69 there. "
                 "A 1×1 conv at stride 2 (the downsample) reads a strided phase view, not flat rows: the box, its "
                 "blocks padded to the map (14–31 % more MMA), is its default with dy_bn (1.42 -> 0.76). The stem's "
                 "3 channels run 4-wide dense taps (2.44).",
    },
    "vectors": (
        "The narrow cp.async are the per-channel fp32 vectors indexed by the reduction channel, reloaded each "
        "step: dgrad's `dy_bn` coefficients (c1, c2, c3, mean: 4) and the forward prologue's scale and shift "
        "(2). A vector is BLOCK_K values (256 bytes), fewer than 4 per thread, and Triton's coalescing spreads a "
        "1-D load over all of the CTA's threads: one 4-byte element each; the language cannot give a load fewer "
        "threads. They are cp.async like the tiles, so the pipeline depth is unchanged, and they cost 2–4 "
        "instructions per warp per step. `triton_dy_pass` and the prologue pass remove them."),
}


TRANSFORM_SHARE = 0.05  # a transform adding less than this to the issue ratio is not named as a reason


def reasons(r: dict) -> list:
    """``[(target, figure, reason)]`` for each target record ``r`` misses (empty when it meets all). An issue-ratio
    miss has ``loop`` (figure: the ratio without the transform) where the loop misses even without its operand
    transform, and ``transform`` (figure: what the transform adds) where that adds more than
    :data:`TRANSFORM_SHARE`: one or both."""
    misses = target_problems([r])
    if not misses:
        return []
    out = []
    for m in misses[0][1]:
        if m.startswith("issue_ratio"):
            free = r.get("transform_free_ratio")
            if r.get("loop_transforms", free is not None) and free is None:
                out.append(("issue_ratio", r["issue_ratio"], "unexplained"))
                continue
            if free is None or free > issue_target(r):
                out.append(("issue_ratio", r["issue_ratio"] if free is None else free, "loop"))
            if free is not None and r["issue_ratio"] - free > TRANSFORM_SHARE:
                out.append(("issue_ratio", round(r["issue_ratio"] - free, 3), "transform"))
        elif m.endswith("scalar loads in the loop"):
            ld = r["loads"]
            narrow = ld.get("ldgsts_narrow", 0)
            ok = not ld.get("ldg_scalar", 0) and narrow == r.get("loop_vectors", -1)
            out.append(("scalar_loads", narrow + ld.get("ldg_scalar", 0), "vectors" if ok else "unexplained"))
        else:
            out.append((m.split()[0], m, "unexplained"))
    return out


def unexplained(records: list) -> list:
    """The ids of records with a miss no reason covers."""
    return [record_id(r) for r in records if any(why == "unexplained" for _, _, why in reasons(r))]


def _why_text(kernel: str, why: str) -> str:
    w = WHY[why]
    return w[kernel] if isinstance(w, dict) else w


def render(records: list) -> str:
    """The Markdown document of every miss: one row per record, the reasons after the table."""
    rows = [(r, reasons(r)) for r in records]
    rows = [(r, rs) for r, rs in rows if rs]
    rows.sort(key=lambda t: (-max(0.0, issue_lost_us(t[0])) * t[0]["count"], record_id(t[0])))
    lines = [
        "# Specs that miss a cost-report target, and why",
        "",
        "Generated by `python -m resnet_fast.kernels.cost_report --misses docs/COST_MISSES.md` from the committed "
        "baseline (`resnet_fast/kernels/cost_baseline.json`); `tests/test_cost_report.py` fails when it is stale. "
        "Every figure is a **static estimate** from the sm_90 SASS (bf16 ResNet-50, batch 256), not a measurement.",
        "",
        "Default for these convs (and all others): the cuDNN composite while nothing is measured "
        "(`autotune.impl_heuristic`); on the GPU the chooser times the Triton kernels, the composite and "
        "`triton_dy_pass` per conv and keeps the fastest.",
        "",
        f"{len(rows)} of {len(records)} records miss a target. Columns: the issue-ratio target and the ratio; the "
        "lowest ratio of every config the launcher may pick for the launch, each compiled as it would run "
        "(`best`: ratio / number of candidates; `cost_report.best_candidates`); the reasons with their figures "
        "(`loop`: the ratio without the operand transform; `transform`: what the transform adds; `vectors`: "
        "narrow loads per warp per step); the issue-bound time beyond max(MMA, memory) per step, est µs (0: the "
        "miss costs no time in the model). Sorted by that time.",
        "",
        "| spec (layer\\|role\\|kernel\\|variant) | n | config | target | issue | best | reasons | lost µs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r, rs in rows:
        why = ", ".join(f"{w} ({'+' if w == 'transform' else ''}{f:.2f})" if isinstance(f, float) else
                        f"{w} ({f})" for _, f, w in rs)
        bc = r.get("best_candidate")
        best = f"{bc['issue_ratio']:.2f} / {bc['candidates']}" if bc else "-"
        lines.append(f"| {record_id(r).replace('|', chr(92) + '|')} | {r['count']} | {r['config']} | "
                     f"{issue_target(r)} | {r['issue_ratio']:.2f} | {best} | {why} | "
                     f"{max(0.0, issue_lost_us(r)) * r['count']:.0f} |")
    lines += ["", "## Why", ""]
    used = {(r["kernel"], why) for r, rs in rows for _, _, why in rs}
    for why in ("transform", "loop", "vectors"):
        kernels = sorted(k for k, w in used if w == why)
        if not kernels:
            continue
        if isinstance(WHY[why], dict):
            lines.append(f"- **{why}**")
            lines += [f"  - {k}: {_why_text(k, why)}" for k in kernels]
        else:
            lines.append(f"- **{why}**: {WHY[why]}")
    if any(why == "unexplained" for k, why in used):
        lines.append("- **unexplained**: no reason covers it yet (the tests fail until one does).")
    return "\n".join(lines) + "\n"
