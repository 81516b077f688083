"""The pipelines as users get them: each file alone, loaded by diffusers from a fresh modules cache in a process
that cannot import anything of this repository, in each form ``custom_pipeline=`` takes; and the rules that make
that possible (what the files import, one pipeline class each, component types diffusers can check).

How diffusers 0.42 resolves ``custom_pipeline`` (``pipeline_loading_utils._get_custom_pipeline_class``): a value
ending in ``.py`` is a file, loaded under its own name; any other value names a folder or a Hub repo, in which it
looks for ``pipeline.py`` (``CUSTOM_PIPELINE_FILE_NAME``). ``dynamic_modules_utils.get_cached_module_file`` then
copies the file into ``HF_MODULES_CACHE/diffusers_modules/local/`` (a file or a local folder's ``pipeline.py``) or,
for a repo id, downloads it with ``hf_hub_download`` and copies it to ``.../local/<user>--<repo>/<commit>/``, and
imports it there, without the folder it came from on ``sys.path``: so the file can import installed packages only.
"""

import ast
import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys

import pytest
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils.dynamic_modules_utils import find_pipeline_class, get_relative_imports

from tests.tiny import save_tiny_sd3


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# kind: (file, class, parent, the scheduler the loaded pipeline samples and inverts with)
PIPELINES = {
    "sd": ("pipeline_inversion.py", "InversionPipeline", StableDiffusionPipeline, "DDIMScheduler"),
    "sdxl": ("pipeline_inversion_sdxl.py", "InversionXLPipeline", StableDiffusionXLPipeline, "DDIMScheduler"),
    "sd3": (
        "pipeline_inversion_sd3.py",
        "InversionSD3Pipeline",
        StableDiffusion3Pipeline,
        "FlowMatchEulerDiscreteScheduler",
    ),
}
ALLOWED_PACKAGES = {"torch", "diffusers", "numpy", "PIL"}
FORMS = ["file", "folder", "hub", "from_pipe"]
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"
STEPS = 10

# Run as `python -c LOADER <json>` in a folder of its own: loads the pipeline in each form the way a user does, makes
# its prediction (noise, or SD3's velocity) a known constant per channel (the last layer, the UNet's `conv_out` or the
# transformer's `proj_out`, outputs its bias alone), inverts two images and samples them back with the same steps and
# guidance, which with a constant prediction is exact to float precision.
LOADER = r"""
import importlib.util, inspect, json, logging, os, sys, traceback

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import HF_MODULES_CACHE, dynamic_modules_utils
from PIL import Image

args = json.loads(sys.argv[1])
assert HF_MODULES_CACHE == args["modules_cache"], HF_MODULES_CACHE
assert importlib.util.find_spec(args["module"]) is None, "the pipeline is importable without diffusers' loader"


class RepoInfo:
    sha = args["hub_commit"]


# a Hub custom pipeline's one network call besides its download, asking for the commit that names its cache folder
dynamic_modules_utils.model_info = lambda repo_id, revision=None, token=None: RepoInfo()

warnings_seen = []


class Keep(logging.Handler):
    def emit(self, record):
        warnings_seen.append(record.getMessage())


logging.getLogger("diffusers").addHandler(Keep(logging.WARNING))


def denoiser(pipe):
    return pipe.transformer if hasattr(pipe, "transformer") else pipe.unet


def reconstruct(pipe):
    pipe.set_progress_bar_config(disable=True)
    c = torch.randn(4, generator=torch.Generator().manual_seed(0)) * 0.5
    last = pipe.transformer.proj_out if hasattr(pipe, "transformer") else pipe.unet.conv_out
    last.weight.data.zero_()
    # the transformer's proj_out emits each patch as (row, column, channel), channel fastest: c once per pixel
    last.bias.data.copy_(c.repeat(last.bias.numel() // c.numel()))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(2)]
    prompts = ["a red square", "a blue circle"]
    inv = pipe.invert(images, prompts, num_inference_steps=args["steps"], guidance_scale=3.0)
    out = pipe(
        prompts,
        latents=inv.latents,
        num_inference_steps=args["steps"],
        guidance_scale=3.0,
        height=16,
        width=16,
        output_type="latent",
    ).images
    return float((inv.latents - inv.image_latents).abs().max()), float((out - inv.image_latents).abs().max())


for form, custom_pipeline in args["forms"].items():
    warnings_seen.clear()
    result = {"form": form}
    try:
        if form == "from_pipe":
            stock = DiffusionPipeline.from_pretrained(args["model"])
            pipe = DiffusionPipeline.from_pipe(stock, custom_pipeline=custom_pipeline, trust_remote_code=True)
            result["stock"] = type(stock).__name__
            result["shares_denoiser"] = denoiser(pipe) is denoiser(stock)
        else:
            pipe = DiffusionPipeline.from_pretrained(
                args["model"], custom_pipeline=custom_pipeline, trust_remote_code=True
            )
        result["class"] = type(pipe).__name__
        result["mro"] = [cls.__name__ for cls in type(pipe).__mro__]
        result["file"] = inspect.getfile(type(pipe))
        result["scheduler"] = type(pipe.scheduler).__name__
        result["moved"], result["error"] = reconstruct(pipe)
    except Exception:
        result["traceback"] = traceback.format_exc()
    result["warnings"] = list(warnings_seen)
    print("RESULT " + json.dumps(result), flush=True)

installed = tuple(os.path.realpath(p) + os.sep for p in {sys.prefix, sys.base_prefix, sys.exec_prefix})
# (a few modules, as torch.classes, carry a made-up relative __file__ that names no file)
files = {m.__file__ for m in list(sys.modules.values()) if isinstance(getattr(m, "__file__", None), str)}
files = {os.path.realpath(f) for f in files if os.path.isabs(f)}
print("IMPORTED " + json.dumps(sorted(f for f in files if not f.startswith(installed))))
"""


@pytest.fixture(scope="module")
def tiny_sd3_dir(tmp_path_factory):
    """The tiny SD3 saved as a diffusers folder (the ``tiny_<kind>_dir`` that ``loaded`` asks for)."""
    return save_tiny_sd3(str(tmp_path_factory.mktemp("models") / "tiny-sd3"))


def clean_env(tmp):
    """The environment of a user who has the packages installed and nothing of this repository on the path."""
    env = dict(os.environ)
    repo = os.path.realpath(REPO)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    paths = [p for p in paths if os.path.realpath(p) != repo and not os.path.realpath(p).startswith(repo + os.sep)]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    else:
        env.pop("PYTHONPATH", None)
    env.update(
        HF_HOME=str(tmp / "hf-home"),
        HF_HUB_CACHE=str(tmp / "hub-cache"),
        HF_MODULES_CACHE=str(tmp / "modules"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        DIFFUSERS_VERBOSITY="warning",
        TRANSFORMERS_VERBOSITY="error",
        OMP_NUM_THREADS="1",  # tiny models, and a shared machine whose cores a second thread only waits for
    )
    return env


def hub_cache_with(tmp, repo_id, pipeline_file):
    """``repo_id`` holding ``pipeline_file`` as ``pipeline.py``, laid out as ``hf_hub_download`` leaves a download in
    its cache (``refs/main`` naming the commit, the file under ``snapshots/<commit>/``), which it answers from when
    offline."""
    folder = tmp / "hub-cache" / ("models--" + repo_id.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(HUB_COMMIT)
    (folder / "snapshots" / HUB_COMMIT).mkdir(parents=True)
    shutil.copyfile(pipeline_file, folder / "snapshots" / HUB_COMMIT / "pipeline.py")


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def loaded(request, tmp_path_factory):
    """Loads one pipeline in every form in one fresh process (one import of torch and diffusers for all of them):
    ``{"kind", "results": {form: result}, "imported": [files outside the installed packages], "modules_cache",
    "repo_id", "stderr"}``."""
    kind = request.param
    file_name = PIPELINES[kind][0]
    model = request.getfixturevalue(f"tiny_{kind}_dir")
    tmp = tmp_path_factory.mktemp(f"standalone-{kind}")

    # the file alone in an empty folder, as a user who downloaded it has it
    alone = tmp / "download"
    alone.mkdir()
    shutil.copyfile(os.path.join(REPO, file_name), alone / file_name)
    # a folder laid out as a Hub repo holding the pipeline: the file under the name diffusers looks for
    folder = tmp / "pipeline-repo"
    folder.mkdir()
    shutil.copyfile(os.path.join(REPO, file_name), folder / "pipeline.py")
    repo_id = f"user/{file_name[:-3].replace('_', '-')}"
    hub_cache_with(tmp, repo_id, os.path.join(REPO, file_name))
    elsewhere = tmp / "elsewhere"  # the working directory: unrelated to the repository and to the file
    elsewhere.mkdir()

    forms = {
        "file": str(alone / file_name),
        "folder": str(folder),
        "hub": repo_id,
        "from_pipe": str(alone / file_name),
    }
    args = {
        "model": model,
        "forms": forms,
        "module": file_name[:-3],
        "modules_cache": str(tmp / "modules"),
        "hub_commit": HUB_COMMIT,
        "steps": STEPS,
    }
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, json.dumps(args)],
        cwd=elsewhere,
        env=clean_env(tmp),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    results = [json.loads(line[len("RESULT ") :]) for line in lines if line.startswith("RESULT ")]
    imported = [json.loads(line[len("IMPORTED ") :]) for line in lines if line.startswith("IMPORTED ")]
    return {
        "kind": kind,
        "results": {r["form"]: r for r in results},
        "imported": imported[0],
        "modules_cache": os.path.realpath(tmp / "modules"),
        "repo_id": repo_id,
        "stderr": proc.stderr,
    }


def expected_module_file(loaded, form):
    """Where diffusers' loader puts the copy it imports (``get_cached_module_file``)."""
    local = os.path.join(loaded["modules_cache"], "diffusers_modules", "local")
    file_name = PIPELINES[loaded["kind"]][0]
    if form in ("file", "from_pipe"):
        return os.path.join(local, file_name)
    if form == "folder":
        return os.path.join(local, "pipeline.py")
    return os.path.join(local, loaded["repo_id"].replace("/", "--"), HUB_COMMIT, "pipeline.py")


def check_form(loaded, form):
    result = loaded["results"][form]
    assert "traceback" not in result, result["traceback"] + loaded["stderr"]
    _, class_name, parent, scheduler = PIPELINES[loaded["kind"]]
    assert result["class"] == class_name and parent.__name__ in result["mro"]
    assert os.path.realpath(result["file"]) == expected_module_file(loaded, form)
    # the inversion's own sampler: `__init__` swapped SDXL's Euler for DDIM; SD3's flow-matching Euler stays
    assert result["scheduler"] == scheduler
    assert result["moved"] > 0.5  # the inversion did go somewhere
    assert result["error"] <= 1e-5, result  # and the same DDIM came back to z0
    # diffusers compared each component with the `__init__` annotations and found them the expected classes
    signs = ("Expected types for", "cannot get type annotation", "not switched over")
    typing_warnings = [w for w in result["warnings"] if any(sign in w for sign in signs)]
    assert not typing_warnings, typing_warnings


@pytest.mark.parametrize("kind", sorted(PIPELINES))
def test_pipeline_file_imports_only_installed_packages(kind):
    """torch, diffusers, numpy, PIL and the standard library: diffusers imports the file from its modules cache, where
    neither this repository nor a sibling file of the pipeline is importable."""
    path = os.path.join(REPO, PIPELINES[kind][0])
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    imported = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            imported.append(("." * node.level + (node.module or ""), node.lineno))
    assert imported  # the walk found the imports
    allowed = ALLOWED_PACKAGES | set(sys.stdlib_module_names)
    outside = [(name, line) for name, line in imported if name.startswith(".") or name.split(".")[0] not in allowed]
    assert not outside, f"{path} imports {outside}"
    # diffusers' own reading of the file: no relative import it would have to copy along
    assert get_relative_imports(path) == []


@pytest.mark.parametrize("kind", sorted(PIPELINES))
def test_pipeline_file_holds_exactly_one_pipeline_class_with_its_parents_component_types(kind):
    file_name, class_name, parent, _ = PIPELINES[kind]
    spec = importlib.util.spec_from_file_location(f"standalone_{kind}", os.path.join(REPO, file_name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    own = [
        cls
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, DiffusionPipeline) and cls.__module__ == module.__name__
    ]
    assert [cls.__name__ for cls in own] == [class_name]
    assert find_pipeline_class(module) is own[0]  # what diffusers' loader picks when no class name is given
    # annotations read from the parent's signature: the classes the loader and `from_pipe` check components against
    assert own[0]._get_signature_types() == parent._get_signature_types()


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
def test_loads_alone_and_reconstructs(loaded, form):
    """Forms of ``custom_pipeline`` (each loaded and checked in the fresh process of ``loaded``):

    - ``file``: the path of the file, copied alone into an empty folder.
    - ``folder``: a local folder holding the file as ``pipeline.py``, laid out as a Hub repo holding the pipeline
      would be: ``get_cached_module_file`` finds ``pipeline.py`` in it and takes its ``is_local_file`` branch.
    - ``hub``: a Hub repo id. ``get_cached_module_file`` takes its repo branch: ``hf_hub_download(repo_id,
      "pipeline.py")``, which offline answers from a cache laid out as a download leaves it, then the commit from
      ``model_info`` (the one network call, stubbed to the cached commit) names the folder the file is copied to.
      Everything after the download is diffusers' own code path for a Hub pipeline.
    - ``from_pipe``: ``DiffusionPipeline.from_pipe(stock, custom_pipeline=<file>)`` on a stock pipeline, sharing its
      components.
    """
    check_form(loaded, form)
    if form == "from_pipe":
        result = loaded["results"][form]
        assert result["shares_denoiser"] and result["stock"] == PIPELINES[loaded["kind"]][2].__name__


@pytest.mark.slow
def test_the_process_imported_nothing_of_the_repository(loaded):
    repo = os.path.realpath(REPO) + os.sep
    # outside the installed packages and the standard library, only the copies in the modules cache
    assert [f for f in loaded["imported"] if f.startswith(repo)] == []
    assert all(f.startswith(loaded["modules_cache"] + os.sep) for f in loaded["imported"]), loaded["imported"]
    assert expected_module_file(loaded, "hub") in loaded["imported"]
