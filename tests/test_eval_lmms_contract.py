"""The lmms-eval plugin against lmms-eval's own contract: what its tasks hand the model (gen_kwargs as
its TaskConfig completes them, doc_to_visual functions that open files themselves) and what its
`--model_args` parser leaves for the model's arguments."""

import math
import os

import pytest

from test_eval_fixtures import write_mp4
from test_eval_lmms_plugin import instance, lm, require_lmms_eval  # noqa: F401  (lm: the tiny model fixture)


def test_a_doc_to_visual_that_cannot_open_its_files_is_a_failed_answer_not_a_crash(lm, tmp_path):
    """Tasks' doc_to_visual often read the files themselves (MVBench's frame subsets list a frame
    folder, image tasks open their images): a missing folder there is an unreadable video, answered
    "" (an infinite loss) and logged, and the next request is answered."""
    video = str(write_mp4(tmp_path / "v.mp4"))
    lm.task_dict = {"toy": {"test": [{"frames": str(tmp_path / "missing")}, {"video": video}]}}

    def lists_its_frame_folder(doc):
        return sorted(os.listdir(doc["frames"]))

    def reqs(kind, arg):
        return [instance(kind, ("Q?", arg, lists_its_frame_folder, 0, "toy", "test")),
                instance(kind, ("Q?", arg, lambda d: [d["video"]], 1, "toy", "test"))]

    replies = lm.generate_until(reqs("generate_until", {"max_new_tokens": 2}))
    assert replies[0] == "" and isinstance(replies[1], str)
    (bad, _), (good, _) = lm.loglikelihood(reqs("loglikelihood", " A"))
    assert math.isinf(bad) and math.isfinite(good)


def test_lmms_evals_default_until_does_not_cut_open_ended_answers(lm, tmp_path, monkeypatch):
    """lmms-eval's TaskConfig adds until=["\\n\\n"] (its few-shot delimiter) to every task whose
    generation_kwargs name none, as VideoChatGPT's (max_new_tokens 1024): a multi-paragraph answer is
    kept whole, as llava_vid / llava_onevision / qwen2_5_vl return it. A task's own stop still cuts,
    and the answer before it is stripped."""
    lm.task_dict = {"toy": {"test": [{"video": str(write_mp4(tmp_path / "v.mp4"))}]}}
    answer = "The man opens the door.\n\nThen he walks to the car and drives away."
    videochatgpt = {"max_new_tokens": 1024, "temperature": 0.0, "top_p": 1.0, "num_beams": 1, "do_sample": False,
                    "until": ["\n\n"]}
    activitynetqa = {"until": ["ASSISTANT:"], "max_new_tokens": 64, "do_sample": False}
    monkeypatch.setattr(lm.predictor, "reply", lambda prompt, frames, **kw: answer if kw["max_new_tokens"] > 64
                        else "yes \nASSISTANT: and more")
    reqs = [instance("generate_until", ("Describe the video.", g, lambda d: [d["video"]], 0, "toy", "test"))
            for g in (videochatgpt, activitynetqa)]
    assert lm.generate_until(reqs) == [answer, "yes"]


@pytest.mark.parametrize("arg", ["fps=0", "fps=-1", "fps=nan", "num_frames=0", "num_frames=8.5", "num_frames=abc",
                                 "max_new_tokens=0"])
def test_bad_model_args_fail_at_load_naming_the_argument(arg, qwen2_mamba_dir):
    """fps=0 would otherwise answer every request "" (each video "unreadable"), a whole run scored
    wrong; num_frames=0 would fail only at the first request, without naming the argument."""
    require_lmms_eval()
    from storm_vlm.eval.lmms_plugin import Storm

    with pytest.raises(ValueError, match=f"model_args: {arg.split('=')[0]} must be"):
        Storm.create_from_arg_string(f"pretrained={qwen2_mamba_dir},device=cpu,dtype=float32,{arg}")


def test_numbers_as_lmms_eval_parses_them_are_accepted(qwen2_mamba_dir):
    """lmms-eval's parser leaves "1" and "8" ints."""
    require_lmms_eval()
    from storm_vlm.eval.lmms_plugin import Storm

    m = Storm.create_from_arg_string(f"pretrained={qwen2_mamba_dir},device=cpu,dtype=float32,fps=1,num_frames=8,"
                                     "max_new_tokens=32")
    assert (m.fps, m.num_frames, m.default_max_new_tokens) == (1.0, 8, 32)
