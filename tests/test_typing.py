"""A type checker reads the forms eager code takes.

The modules' forward carries TorchScript's annotations, which cover only the
scripted subset (a padded tensor, int64 lengths); under ``TYPE_CHECKING`` the
modules declare eager's forms as overloads. Here mypy checks client code that
calls ``forward`` directly with a PackedSequence, lengths as a list or a numpy
array, and the LSTM's (h, c), and must report no error and the right result
types. (Calling the module itself, ``rnn(x)``, goes through
``nn.Module.__call__``, which torch types as returning Any.)
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import rnnkern

CLIENT = textwrap.dedent("""
    import numpy as np
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence
    import rnnkern

    x = torch.randn(5, 2, 3)
    packed = pack_padded_sequence(x, torch.tensor([5, 3]))
    for cls in (rnnkern.RNN, rnnkern.GRU):
        rnn = cls(3, 4)
        out, h = rnn.forward(x, lengths=[5, 3], truncate=2)
        pout, ph = rnn.forward(packed)
        reveal_type(out)
        reveal_type(pout)
    lstm = rnnkern.LSTM(3, 4, proj_size=2)
    o, (hn, cn) = lstm.forward(x, (torch.zeros(1, 2, 2), torch.zeros(1, 2, 4)),
                               lengths=np.array([5, 3]))
    po, (phn, pcn) = lstm.forward(packed)
    reveal_type(o)
    reveal_type(po)
    reveal_type(cn)
    """)


def test_mypy_accepts_every_eager_form_of_forward_and_types_the_results(tmp_path):
    client = tmp_path / "client.py"
    client.write_text(CLIENT)
    env = dict(os.environ, MYPYPATH=str(Path(rnnkern.__file__).resolve().parent.parent))
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"),
         "--ignore-missing-imports", "--follow-imports=silent", "--no-error-summary",
         str(client)],
        capture_output=True, text=True, env=env, timeout=600)
    lines = run.stdout.splitlines()
    assert not [l for l in lines if ": error:" in l], run.stdout
    revealed = [l.split('Revealed type is "', 1)[1].rstrip('"') for l in lines
                if "Revealed type" in l]
    tensor, packed = "torch._tensor.Tensor", "fallback=torch.nn.utils.rnn.PackedSequence"
    assert len(revealed) == 5, run.stdout + run.stderr
    assert revealed[0] == tensor and revealed[2] == tensor and revealed[4] == tensor, revealed
    assert revealed[1].endswith(packed + "]") and revealed[3].endswith(packed + "]"), revealed
    assert run.returncode == 0, run.stdout + run.stderr
