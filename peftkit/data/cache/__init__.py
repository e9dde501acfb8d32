"""The data cache: encoded data sets kept on disk, keyed by what they were made from (`key`),
stored as memory-mapped Arrow files (`store`), built by several processes (`build`), found again
without loading the tokenizer (`starts`), and bounded (`prune`)."""
