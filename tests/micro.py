"""The smoke preset shrunk to seconds per stage, for tests that exercise a study's plumbing (Ray, the
store, manifests, resumption) rather than its numbers. One list, so every such test shrinks the same way;
a test adds or replaces keys with `micro(...)` (the CLI refuses a key set twice)."""

MICRO = ["tokenizer.total_steps=4", "baseline.total_steps=4", "teacher.total_steps=4", "dmd.total_steps=4",
         "refine.total_steps=2", "generator.total_steps=4", "generator.eval_every=0", "eval.sampler_steps=4",
         "eval.gfid_samples=8", "eval.gfid_ref_images=16", "eval.rfid_images=8", "eval.grid_images=4",
         "data.train_limit=128", "data.val_limit=32", "prior.num_samples=64"]


def micro(*extra: str) -> list[str]:
    """MICRO with `extra` ("key=value") added, replacing MICRO's value of a key it names."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [o for o in MICRO if o.split("=", 1)[0] not in keys] + list(extra)


def set_args(overrides: list[str]) -> list[str]:
    """`["a=1", "b=2"]` -> `["--set", "a=1", "--set", "b=2"]`, as a user types them."""
    return [a for o in overrides for a in ("--set", o)]
