"""The tools over compiled images: inspection (`images`), diff and explain, CI checks, and
store maintenance (`fsck_store`).  They compose through `cfsc.build`; the CLI sits on top.
"""
