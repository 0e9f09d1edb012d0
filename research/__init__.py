"""Research scripts: experiments on the method that `moon3 build` and training do not need.

They run from a source checkout (`python -m research.grpo ...`, `research.tte`,
`research.eval_missing`) and are not part of the installed package; each docstring says what it
measures and the model cards that cite its results give the commands.

* `research.grpo`: a GRPO stage for the reasoner, rewarded by retrieval through a frozen embedder.
* `research.tte`: Think-Then-Embed with a trained unifier of trace and product embeddings.
* `research.eval_missing`: missing-modality evaluation (completed titles and photos).
"""
