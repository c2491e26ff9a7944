"""run() in a Jupyter notebook: tqdm's widget where ipywidgets is installed, text otherwise."""

import contextlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
zmq = pytest.importorskip("zmq")

SETUP = '''\
import torch
import mlo

net = torch.nn.Linear(3, 1)

@mlo.level(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
def fit(module):
    return ((module(torch.eye(3)) - 1) ** 2).mean()

program = mlo.Program(fit)'''
RUN = "program.run(5, validate=lambda p: {'score': 1.0}, every=5);"
WITHOUT_WIDGETS = "import tqdm.notebook\ntqdm.notebook.IProgress = None  # as without ipywidgets\n"


def execute(cells):
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = nbclient.NotebookClient(notebook, timeout=60, startup_timeout=60,
                                     kernel_name="python3")
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(client.setup_kernel())
        except (RuntimeError, TimeoutError, zmq.ZMQError) as error:
            pytest.skip(f"no Jupyter kernel can start on this machine: {error}")
        for index, cell in enumerate(notebook.cells):
            client.execute_cell(cell, index)
    return [cell.outputs for cell in notebook.cells]


def test_progress_in_a_notebook_is_a_widget_or_text():
    widgets = pytest.importorskip("ipywidgets")
    assert widgets
    outputs = execute([SETUP, RUN, WITHOUT_WIDGETS + RUN])
    widget = [o for o in outputs[1] if o.output_type == "display_data"]
    assert widget and "application/vnd.jupyter.widget-view+json" in widget[0].data
    lines = "".join(o.text for o in outputs[1] if o.output_type == "stream")
    assert "step 5/5: validate/score=1" in lines  # one line per validation, under the widget
    text = "".join(o.text for o in outputs[2] if o.output_type == "stream" and o.name == "stderr")
    assert "10/10" in text and not any(o.output_type == "display_data" for o in outputs[2])
