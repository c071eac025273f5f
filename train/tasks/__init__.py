"""Synthetic memory tasks, numpy only: the generators behind `data.source` = mqar / niah (used by
`train.data`) and the test sets of `eval.mqar`, `eval.mqar_sweep` and `eval.niah`.

    train.tasks.mqar   multi-query associative recall (Zoology): make_mqar, mqar_seed,
                       check_mqar_args
    train.tasks.niah   needle in a haystack: make_niah (synthetic vocabulary; niah_vocab gives
                       its token ranges), make_passkey (byte-level text passkey)
"""
