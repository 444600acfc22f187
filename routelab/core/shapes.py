"""The shape letters of tensor names: ``logits_TE`` is ``[T, E]``, ``x_BSD`` is ``[B, S, D]``.

A suffix of capital letters lists a tensor's dimensions in order; every module uses each
letter with the one meaning below (a test checks that every suffix in the package uses only
these letters). A lower-case ``d`` is the width of one attention head.
"""

SHAPE_LETTERS: dict[str, str] = {
    "T": "tokens: the real tokens of a batch, flattened (padding removed); the token rows of a trace",
    "E": "experts",
    "K": "top-k slots of a token (-1 marks an empty slot)",
    "M": "prefetched (predicted) experts per token",
    "C": "capacity slots of an expert",
    "D": "model width (d_model)",
    "H": "hidden width of an expert or FFN",
    "F": "another feature width (a projection, a recurrent state, a similarity space, RoMA's routing vector)",
    "A": "attention heads",
    "B": "sequences of a batch",
    "S": "positions within a sequence",
    "P": "positions of the cached past plus the current tokens (generation with a KV cache)",
    "N": "expert input rows: (token, expert) assignments in expert order, or Soft MoE slots",
    "U": "rows of a flattened [B, S] batch, padding included (transformers MoE blocks)",
    "Z": "padding rows among U",
    "V": "vocabulary",
    "L": "layers",
    "G": "selection groups: expert groups (group-limited top-k), token groups choosing together (expert choice), "
         "or the heads of a multi-head adapter mixture (MHR), each mixing its own block of the adapters",
    "W": "windows or chunks of consecutive tokens",
    "I": "input width of an adapted linear layer (adapters)",
    "O": "output width of an adapted linear layer (adapters)",
    "Y": "items to schedule into batches (tokens or sequences)",
    "X": "a layer-major bitmap over layers x experts",
    "Q": "checkpoints (evaluations) of a training run",
    "R": "rank of a LoRA adapter (adapters)",
    "J": "nearest neighbours (RoMA)",
}
