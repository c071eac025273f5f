"""Synthetic memory tasks, numpy only: the generators behind `data.source` = mqar / niah /
segment_recall (used by `train.data`) and the test sets of `eval.mqar`, `eval.mqar_sweep`,
`eval.niah` and `eval.segment_recall`.

    train.tasks.mqar   multi-query associative recall (Zoology): make_mqar, mqar_seed,
                       check_mqar_args
    train.tasks.niah   needle in a haystack: make_niah (synthetic vocabulary; niah_vocab gives
                       its token ranges), make_passkey (byte-level text passkey)
    train.tasks.segment_recall  cross-segment recall: facts (2-symbol key, 1-symbol value),
                       asked `distance` segments later: make_segment_recall, segment_recall_seed
"""
