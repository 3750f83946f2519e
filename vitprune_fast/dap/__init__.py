"""DAP / P3B (Glandorf & Rosenhahn): depth-aware pruning during fine-tuning.

Each attention and each MLP residual branch is a *block*. Detached probes (:mod:`.probes`) measure how much a
block makes the residual stream more discriminative (ΔΨ, the Block Performance Indicator); on a schedule the
mean ΔΨ is turned into per-block keep ratios κ_i under a global parameter budget, and inside each block gates
ranked by first-order Taylor scores decide which units go. At the end :meth:`DAP.plan` is a :class:`Plan` that
:func:`prune_` applies, giving a physically smaller stock timm model. The README's 'DAP' section says where it
follows the reference and where not.

Usage in any training loop::

    dap = DAP(model, target=0.5, schedule=Schedule.for_steps(steps))
    for x, y in loader:
        loss = criterion(model(x), y) + dap.loss(y)   # probe losses on the features of this forward
        opt.zero_grad(); loss.backward(); opt.step()
        dap.step()                                   # probes' optimizer, Taylor scores, κ / mask updates
    plan = dap.finalize(opt)                         # = dap.plan(); dap.remove(); prune_(model, plan, opt)

To resume a long run, save ``dap.state_dict()`` (after ``dap.step()``) with the model's and the optimizer's state
dicts; a new ``DAP`` built with the same arguments on the same architecture continues exactly after
``dap.load_state_dict(state)`` (``finetune_dap(checkpoint=...)`` does this for its own loop).

Under DistributedDataParallel (torchrun)::

    dap = DAP(model, target=0.5, schedule=Schedule.for_steps(steps))   # the unwrapped model: DAP hooks its modules
    net = DistributedDataParallel(model, device_ids=[local_rank])      # wrap after (or before: the same modules)
    for x, y in loader:                                                # this rank's shard (DistributedSampler)
        loss = criterion(net(x), y) + dap.loss(y)
        opt.zero_grad(); loss.backward(); opt.step()
        dap.step()                                                     # averages over the ranks (below)
    del net                                                            # then prune the model itself
    plan = dap.finalize(opt)                                           # the same plan on every rank

DAP finds the process group itself (``process_group=`` to choose one). At construction every rank takes rank 0's
probe initialisation; in every ``dap.step()`` one all-reduce averages the probes' gradients, this step's ΔΨ and the
gates' gradient (Taylor scores), so every rank holds the same DAP state and makes the same decisions, and a run on
several ranks equals one process over the concatenated batch (with equal per-rank batches, and in eval mode: in
training mode the probes' BatchNorms take per-rank batch statistics, as any BatchNorm under DDP; the decisions are
still identical on every rank). With ``train_gates`` the gates' gradient is averaged as soon as backward computes it,
before ``opt.step()``. Call ``dap.loss`` / ``dap.step`` on every rank; save ``dap.state_dict()`` from rank 0 only
(it is the same everywhere) and load it on every rank. Prune the unwrapped model (``dap.finalize``) and wrap it in a
new DDP to go on training: a DDP wrapper keeps buckets of the old shapes.

Layout: :mod:`.schedule` (when DAP scores, ramps, sharpens), :mod:`.budget` (κ allocation maths), :mod:`.config`
(:class:`DAPConfig`, the settings, also the saved config), :mod:`.probes` (the ΔΨ probes), :mod:`.pruner` (the
:class:`DAP` object: hooks, gates, updates, plan), :mod:`.state` (checking a saved state), :mod:`.loop`
(:func:`finetune_dap`).

Choices (defaults; ``FAITHFUL`` holds the reference's values for the flagged quirks):

- **Gates.** One gate per block, inside what a stock timm block can express after slicing: attention gates
  scale q, k and v of a head-dim index in *every* head (``attn_mode="dims"``, the reference's ``attn_qkv``
  gate: each block keeps a uniform head_dim and all its heads) or whole heads (``attn_mode="heads"``); MLP
  gates scale hidden units (fc2 input). The reference's per-block residual in/out gates (``attn_in``,
  ``attn_out``, ``mlp_in``, ``mlp_out``) stay out, so the residual width is not pruned and the reference's
  LayerNorm-after-gather quirk does not arise. With one gate per block the reference's percentile-rank × gate
  scale and coupled threshold search reduce to keeping the top-k Taylor scores.
- **Parameter accounting.** W_i is the prunable part of block i (what its gate removes: qkv rows + proj
  columns per attention channel, Swin bias-table rows per removed head; fc1 row + bias + fc2 column per MLP
  unit). LayerNorms and output biases stay and count as non-block parameters, so κ_i is exactly the kept
  fraction of block i's gate units. ``target`` is the fraction of *all* model parameters to remove (the
  reference's prune rate p); ``block_params_only`` is the reference flag that takes it over W only.
- **Budget tolerance.** Kept units are integers; per-block counts are rounded jointly to the budget, so the
  final count is within half of the largest unit's cost (``DAP.tolerance``) of the target, unless the one-unit
  minimum per block binds.
- **κ allocation** follows the reference exactly (per-parameter normalisation by the kept count R_i, EMA on the
  normalised z, α-mix, projection with clipping). Fixed point for equal ΔΨ: κ_i ∝ 1/R_i = 1/(κ_i W_i), i.e.
  κ_i ∝ W_i^(-1/2). If no block has positive mean ΔΨ the reference would divide by a non-positive maximum; we
  divide by max|ΔΨ| instead. The projection iterates until no block newly saturates (the reference stops after
  20 rounds: ``projection_iters=20``).
- **Masks are frozen between updates** (``train_gates=False``). Reference quirk: they are Parameters that
  AdamW trains with the main LR (no weight decay) between updates (``train_gates=True``: add
  :meth:`DAP.gate_parameters` to your optimizer without weight decay).
- **Soft-mask centre** between the last pruned and the first kept unit (symmetric). Reference: on the first
  kept unit, which then sits at exactly 0.5 (``mask_center="reference"``). The hard masks are the same.
- **Probe mode** follows ``model.training`` (BatchNorm batch statistics in training). The reference trains in eval
  mode (no drop-path, probe BatchNorms on their initial running statistics): ``finetune_dap(eval_mode=True)``.
- **Swin** (our choices, not in the reference): two blocks per Swin block (W-MSA/SW-MSA attention, MLP);
  class probe on the mean-pooled token; patch probe on each stage's H×W map at that stage's width (one probe
  stack per stage); PatchMerging and the relative-position tables (in ``dims`` mode) count as non-block.
- **Probes** are stacked per stage on CUDA (one grouped conv + batched matmuls instead of 2 × blocks modules)
  and run one at a time on CPU, where oneDNN's dense convolutions are faster than its grouped ones (measured
  in ``bench/dap.py``); both compute the same numbers (tested). ``batched=True/False`` forces either.
- **Speed-ups** that deviate from the reference, off by default: ``probe_every=k`` (probes on every k-th step)
  and ``probe_batch=n`` (probes on the first n images of the batch).
"""
from .budget import keep_ratio_goal, normalise_bpi, project_to_budget, round_to_budget, soft_clamp, soft_mask
from .config import ATTN_MODES, FAITHFUL, MASK_CENTERS, DAPConfig
from .loop import finetune_dap
from .pruner import DAP
from .schedule import Schedule
from .state import STATE_VERSION

__all__ = ["ATTN_MODES", "DAP", "DAPConfig", "FAITHFUL", "MASK_CENTERS", "STATE_VERSION", "Schedule", "finetune_dap",
           "keep_ratio_goal", "normalise_bpi", "project_to_budget", "round_to_budget", "soft_clamp", "soft_mask"]
