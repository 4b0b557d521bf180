"""Compiler passes: plain functions `(tree, options) -> tree`, run in `cfsc.build.pipeline.PASSES` order.

How to add a pass: write `compiler/passes/<verb_noun>.py` with one public function of that
signature and a docstring saying why it exists and which upstream behaviour it follows; keep
it idempotent (running it twice changes nothing more, a test checks this); put it in
`PASSES` where its inputs are ready.  Passes share no state except what they store on the
`Tree` (`version`, `lowered`, `inodes`, `shared_xattrs`).
"""
