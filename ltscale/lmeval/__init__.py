"""lm-evaluation-harness support: the ``ltscale`` model backend, its entry point and task files.

``ltscale lm-eval ...`` (= ``python -m ltscale.lmeval ...``) runs lm-eval's CLI with the backend
registered and ltscale's tasks on the include path; see ``ltscale.lmeval.entry``. lm-eval itself is
the optional ``[eval]`` extra and is imported only by ``backend`` and ``entry``, so ltscale works
without it. Layout: ``decode`` (load/encode/decode/cut, no lm-eval import), ``backend`` (the lm-eval
model), ``tasks`` (task files and their scoring), ``entry`` (the command).
"""
