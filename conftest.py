"""hypothesis profiles for tests/ and verification/, and verification/'s options --crate-device and
--crate-model (verification/options.py).

dev (default): random exploration. ci (chosen when CI is set): derandomized, fixed examples, no
deadline, sized so `pytest verification/` stays under 5 minutes on 2 cores. thorough: 10× dev's
examples. mutations: ci with a quarter of dev's examples, stopping at the first failure. Choose any
profile with HYPOTHESIS_PROFILE=<name>.
"""

import os

import torch

if not torch.cuda.is_available():
    # crate/models/mssa_kernel.py's Triton kernels then run on CPU tensors under Triton's interpreter
    # (verification/test_mssa_kernel.py); Triton reads this when it is imported (torch._dynamo does)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import Phase, settings

from verification import options

DEV_EXAMPLES = 100

settings.register_profile("dev", max_examples=DEV_EXAMPLES, deadline=None)
settings.register_profile(
    "ci", max_examples=5 * DEV_EXAMPLES, derandomize=True, deadline=None, database=None, print_blob=True
)
settings.register_profile("thorough", max_examples=10 * DEV_EXAMPLES, deadline=None)
# verification/mutations/runner.py's first try: ci's settings with a twentieth of its examples and no
# shrinking (the first failure is the verdict; a survivor is run again with ci's)
settings.register_profile(
    "mutations",
    parent=settings.get_profile("ci"),
    max_examples=DEV_EXAMPLES // 4,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    report_multiple_bugs=False,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


def pytest_addoption(parser):
    options.add_options(parser)


def pytest_configure(config):
    options.configure(config)


def pytest_report_header(config):
    return options.report_header()
