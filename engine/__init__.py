"""Model runtime shared by both worker roles: models, weights, tokenizer, KV pool, scheduler,
sampler and the engine loop. Imports none of Baton's other packages."""
