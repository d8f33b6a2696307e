"""Attention for qorpo's layouts: the masks, the kernels, which kernel runs, and what it costs.

In the shared and packed layouts (qorpo.data.collate) one row holds `prompt | chosen | rejected`
for one pair or several, with pair-relative positions: rejected tokens continue the prompt's
positions, not the chosen response's. A query may attend to a key of its own pair, at or before
it, except that rejected queries never see chosen keys; on sliding-window layers only keys less
than `window` positions back (transformers' rule: q - k < window, so each query sees `window`
keys including itself). transformers has no such mask of its own, so qorpo builds it.

How a shared/packed batch reaches the kernel, step by step:

1. Build (qorpo.api.build → api.choose_layout → `choice.choose`): the model's attention
   implementation is chosen once, before training. CPU: `pairs.use_pair_attention` →
   `pairs.register_pair_attention` registers qorpo's per-pair kernel with transformers'
   `AttentionInterface` as `qorpo_pairs`, and the model is switched to it (in place of sdpa,
   or of the eager attention Gemma 2 has only for its soft-capping). CUDA: FlexAttention,
   after a start-up training step proves its compiled kernels work on this GPU. Otherwise
   the model keeps sdpa/eager with a dense mask.
2. Each forward (qorpo.forward.hidden_states): `masks.model_attention_mask` gives the batch's
   mask in the form the implementation takes — sdpa and the per-pair kernel a (R, 1, L, L) bool
   mask, eager the same as an additive float mask, flex_attention a BlockMask (`flex`) — and,
   for a model with several layer types (Gemma 2/3, Qwen2/3: `layer_types`), a dict of them
   keyed by layer type, which transformers hands each layer by its type. Under the per-pair
   kernel the pair boundaries (`pairs.pair_spans`) are passed as the forward keyword argument
   `qorpo_spans`, which transformers passes through every decoder layer.
3. In every attention layer, transformers calls the registered function with the layer's
   query, key and value and its own `sliding_window` and `softcap`: `pairs.pair_attention`
   runs two small attention calls per pair (no masked block computed), FlexAttention skips
   the BlockMask's empty tiles, sdpa/eager compute every block and mask it.

`cost` says what a laid-out row costs (how long packed rows may grow) and below which row
length the per-pair kernel is not worth its Python loop. Modules: `masks`, `flex`, `pairs`,
`choice`, `cost`; this file holds only the kernels' names, so that importing it costs nothing.
"""

PAIR_ATTENTION = "qorpo_pairs"  # the per-pair kernel's name in transformers' AttentionInterface
FLEX = "flex_attention"  # transformers' FlexAttention implementation
