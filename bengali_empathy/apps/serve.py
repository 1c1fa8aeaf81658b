"""The web page for the people who judge empathy: ``python -m bengali_empathy serve --adapter DIR``.

A Gradio app (the ``serve`` extra pins its major version) on the one loaded model, four tabs:

* **Chat** -- a multi-turn conversation with the tuned model, streamed (:mod:`.conversation`:
  whole graphemes only, the oldest exchanges left out of the prompt by training's rule when it
  outgrows ``max_seq_length``, and the page says so), with regenerate, clear and the decoding options;
* **Side by side** -- one message answered by the tuned model and by its base (adapter disabled);
* **Blind rating** -- prompts sampled from a run's replies (or typed by the rater), the tuned and
  base replies as A and B in random order, a choice and optional 1-5 scores per reply, each
  judgement committed at once (:mod:`.judgements`), progress "pair k of n";
* **Runs** -- the registry's experiments with their key scores and win rate, one run's plots (:mod:`.report`).

Every session has its own state (``gr.State``); generation requests share one queue slot
(``concurrency_id``) and the :class:`~.conversation.Replier`'s lock, so the model runs one request
at a time. Model and user text is shown as plain text (Textboxes; the Chatbot without Markdown or
HTML), so a reply or prompt cannot inject markup. Bad input (an empty or too long message, no
rater name) is a message in the page (``gr.Error``), not a server error.
"""
from __future__ import annotations

import html
import json
import random
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Optional

import gradio as gr

from ..generation.chat import EMPTY_REPLY, Replier, Reply
from ..errors import UserError
from ..generation.decoding import Decoding
from ..records.judgements import Judgement, blind_pair, record_judgement, sampled_prompts, win_rate
from ..records.registry import ASPECTS, find_experiment, list_experiments, recorded_score, responses_of

MODEL = "model"  # the one concurrency slot every generating event shares


def newest_run_with_replies(db: str) -> Optional[int]:
    """The newest experiment of the registry that has generated replies (prompts to rate), if any."""
    if not Path(db).is_file():
        return None
    return next((e["id"] for e in reversed(list_experiments(db)) if responses_of(db, e["id"])), None)


def shown_as_text(turns: list) -> list:
    """Turns for the Chatbot, HTML-escaped: even with Markdown off it renders (sanitised) HTML, and a
    reply or a prompt must show as the text it is, markup included."""
    return [{"role": t["role"], "content": html.escape(t["content"])} for t in turns]


def describe(reply: Reply, max_seq_length: int) -> str:
    """The info line under a reply: prompt length, history, what was left out, speed, seed."""
    parts = [f"prompt {reply.prompt_tokens} tokens: system prompt + {reply.history_turns} earlier turns + this message"]
    if reply.dropped_turns:
        parts.append(f"the {reply.dropped_turns} oldest turns were left out to fit max_seq_length {max_seq_length}")
    if reply.empty:
        parts.append(EMPTY_REPLY)
    if reply.done:
        parts.append(f"{reply.new_tokens} new tokens in {reply.seconds:.1f} s")
    if reply.seed is not None:
        parts.append(f"sampled with seed {reply.seed}")
    return "; ".join(parts)


class App:
    """The handlers of the page, around one :class:`Replier` and one registry file."""

    def __init__(self, replier: Replier, adapter_path: str, db: str, run: Optional[int], pairs: int) -> None:
        self.replier, self.adapter_path, self.db, self.run, self.pairs = replier, adapter_path, db, run, pairs
        self.plots = Path(tempfile.mkdtemp(prefix="bengali_empathy_serve_"))

    # ---------------------------------------------------------------- chat

    def _decoding(self, mode: str, temperature: float, top_p: float, max_new_tokens: float) -> Decoding:
        sampled = mode == "sample"
        return replace(self.replier.decoding, max_new_tokens=int(max_new_tokens), seed=0,
                       temperature=float(temperature) if sampled else 0.0, top_p=float(top_p) if sampled else 1.0)

    def send(self, message: str, turns: list, mode: str, temperature: float, top_p: float, max_new_tokens: float):
        """Chat: the reply to ``message`` after ``turns``, streamed (chatbot, turns, info, message box)."""
        turns = turns or []
        asked = turns + [{"role": "user", "content": message or ""}]
        yield from self._answer(asked, turns, self._decoding(mode, temperature, top_p, max_new_tokens))

    def regenerate(self, turns: list, mode: str, temperature: float, top_p: float, max_new_tokens: float):
        """Chat: a new reply in place of the last one."""
        if not turns or turns[-1]["role"] != "assistant":
            raise UserError("there is no reply to regenerate yet")
        yield from self._answer(turns[:-1], turns, self._decoding(mode, temperature, top_p, max_new_tokens))

    def _answer(self, asked: list, before: list, decoding: Decoding):
        """The reply to ``asked`` as it grows; the session keeps ``before`` until the reply is complete."""
        for reply in self.replier.stream(asked, decoding):
            turns = asked + [{"role": "assistant", "content": reply.text}]
            info = describe(reply, self.replier.max_seq_length)
            yield shown_as_text(turns), turns if reply.done else before, info, ""

    # ---------------------------------------------------------------- side by side

    def compare(self, message: str, mode: str, temperature: float, top_p: float, max_new_tokens: float):
        """Side by side: the tuned reply, then the base reply, to one message (tuned, base, info)."""
        turns = [{"role": "user", "content": message or ""}]
        decoding = self._decoding(mode, temperature, top_p, max_new_tokens)
        tuned = ""
        for reply in self.replier.stream(turns, decoding):
            tuned = reply.text
            yield tuned, "", "tuned: " + describe(reply, self.replier.max_seq_length)
        for reply in self.replier.stream(turns, decoding, base=True):
            yield tuned, reply.text, "base: " + describe(reply, self.replier.max_seq_length)

    # ---------------------------------------------------------------- blind rating

    def start_rating(self, rater: str, session: Optional[dict]):
        """Blind rating: sample this session's prompts and show the first pair."""
        if self.run is None:
            raise UserError("no run with generated replies in the registry: type a prompt of your own to rate")
        rng = random.Random()
        session = {"prompts": sampled_prompts(self.db, self.run, self.pairs, rng), "rated": 0, "rng": rng}
        session["total"] = len(session["prompts"])
        return self._next_pair(session, f"Rating {session['total']} pairs as {rater or '(no name yet)'}.")

    def rate_own_prompt(self, prompt: str, session: Optional[dict]):
        """Blind rating: a pair for a prompt the rater typed, next in line."""
        self.replier.prompt([{"role": "user", "content": prompt or ""}], self.replier.decoding.max_new_tokens)
        session = session or {"prompts": [], "rated": 0, "total": 0, "rng": random.Random()}
        session = {**session, "prompts": [(prompt.strip(), None)] + session["prompts"], "total": session["total"] + 1}
        if session.get("pair") is not None:  # the pair on screen stays, as does what was chosen for it
            progress = self._shown(session, "Your prompt comes after this pair.")[0]
            return (session, progress, *[gr.skip()] * (5 + 2 * len(ASPECTS)))
        return self._next_pair(session, "Your prompt:")

    def submit(self, rater: str, choice: Optional[str], comment: str, session: Optional[dict], *scores):
        """Blind rating: commit the judgement of the pair shown, then show the next pair."""
        pair = (session or {}).get("pair")
        if pair is None:
            raise UserError("no pair to judge: press 'Start' or rate a prompt of your own")
        if choice is None:
            raise UserError("choose A, B or tie before submitting")
        keys = [f"{side}_{a}" for side in ("a", "b") for a in ASPECTS]
        given = {k: int(v) for k, v in zip(keys, scores) if v not in (None, "")}
        record_judgement(self.db, Judgement(pair, choice, rater or "", self.adapter_path, self.replier.system_prompt,
                                            self.replier.decoding.as_dict(), given, (comment or "").strip() or None))
        session = {**session, "rated": session["rated"] + 1}
        return self._next_pair(session, f"Saved judgement {session['rated']}.")

    def _next_pair(self, session: dict, note: str):
        prompts = list(session["prompts"])
        if not prompts:
            session = {**session, "pair": None}
            return (session, *self._shown(session, f"{note} Done: {session['rated']} of {session['total']} rated, "
                                                   "thank you."))
        item = prompts.pop(0)
        prompt, experiment = item if isinstance(item, tuple) else (item, self.run)
        turns = [{"role": "user", "content": prompt}]
        tuned = self.replier.reply(turns).text
        base = self.replier.reply(turns, base=True).text
        pair = blind_pair(prompt, tuned, base, session["rng"], experiment)
        session = {**session, "prompts": prompts, "pair": pair}
        return (session, *self._shown(session, note))

    def _shown(self, session: dict, note: str) -> tuple:
        """progress, prompt, reply A, reply B, and the cleared choice, comment and ten scores."""
        pair = session.get("pair")
        k = session["rated"] + (pair is not None)
        progress = f"{note} Pair {k} of {session['total']}." if pair is not None else note
        texts = (pair.prompt, pair.reply_a, pair.reply_b) if pair is not None else ("", "", "")
        return (progress, *texts, None, "", *([None] * 2 * len(ASPECTS)))

    # ---------------------------------------------------------------- runs

    def runs_table(self) -> list[list]:
        """Runs: one row per experiment with its key scores and the blind win rate."""
        from ..evaluation.metrics import SCORE_NAMES

        rows = []
        for e in list_experiments(self.db) if Path(self.db).is_file() else []:
            m, run = e["metrics"], e["metrics"].get("run", {})
            wins = win_rate(self.db, e["id"])
            scores = [(recorded_score(m, k) or (None, None))[1] for k in SCORE_NAMES]
            rows.append([e["id"], e["timestamp"], run.get("stage"), run.get("steps"), wins.describe() if wins else "",
                         *(round(v, 4) if isinstance(v, (int, float)) else None for v in [m.get("val/loss"), *scores]),
                         e["model_name"]])
        return rows

    def run_detail(self, experiment_id):
        """Runs: the scores, win rate and plots of one experiment (markdown, plot files)."""
        from ..records.report import find_fit, make_plots, read_scalars

        if experiment_id in (None, ""):
            raise UserError("choose an experiment id")
        e = find_experiment(self.db, str(int(experiment_id)))
        if e is None:
            raise UserError(f"no experiment {experiment_id} in {self.db}")
        metrics = json.loads(e["metrics"] or "{}")
        run = metrics.pop("run", {})
        wins = win_rate(self.db, e["id"])
        lines = [f"**experiment {e['id']}**: {run.get('stage')} of `{e['model_name']}`, log dir `{run.get('log_dir')}`",
                 "", "blind judgements: " + (wins.describe() if wins else "none yet"), ""]
        lines += [f"- {k}: {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float))]
        fit = find_fit(Path(run["log_dir"])) if run.get("log_dir") else None
        out = self.plots / str(e["id"])
        out.mkdir(exist_ok=True)
        plots = [(str(out / name), caption) for name, caption in make_plots(read_scalars(fit), out)] if fit else []
        return "\n".join(lines), plots


def _shielded(handler):
    """``handler`` with a :class:`UserError` shown as a message in the page."""
    def run(*args):
        try:
            return handler(*args)
        except UserError as exc:
            raise gr.Error(str(exc)) from exc
    return run


def _streamed(handler):
    """A generating ``handler`` with a :class:`UserError` shown as a message in the page."""
    def run(*args):
        try:
            yield from handler(*args)
        except UserError as exc:
            raise gr.Error(str(exc)) from exc
    return run


def _logged_in_user(request: gr.Request) -> str:
    """The rater's name, preset to the user who logged in (with ``--auth``)."""
    return request.username or ""


def build(app: App) -> gr.Blocks:
    """The Gradio page of ``app``'s handlers."""
    r = app.replier
    with gr.Blocks(title="bengali_empathy") as page:
        gr.Markdown(f"## Bengali empathy\nThe tuned model: adapter `{app.adapter_path}`; its base: the same "
                    "weights with the adapter disabled.")
        with gr.Accordion("Decoding (chat and side by side)", open=False):
            with gr.Row():
                mode = gr.Radio(["greedy", "sample"], value="greedy", label="decoding")
                temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="temperature")
                top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="top_p")
                max_new = gr.Slider(1, max(1, min(1024, r.max_seq_length - 16)), value=r.decoding.max_new_tokens,
                                    step=1, label="max new tokens")
        decoding = [mode, temperature, top_p, max_new]
        with gr.Tab("Chat", id="chat"):
            turns = gr.State([])
            chatbot = gr.Chatbot(label="conversation", render_markdown=False, sanitize_html=True, allow_tags=False,
                                 elem_id="chatbot", height=360)
            message = gr.Textbox(label="message", placeholder="আপনার কথা লিখুন…", elem_id="chat-message")
            with gr.Row():
                send = gr.Button("Send", variant="primary", elem_id="chat-send")
                again = gr.Button("Regenerate", elem_id="chat-regenerate")
                clear = gr.Button("Clear", elem_id="chat-clear")
            chat_info = gr.Textbox(label="generation", interactive=False, elem_id="chat-info")
            outputs = [chatbot, turns, chat_info, message]
            gr.on([send.click, message.submit], _streamed(app.send), [message, turns, *decoding], outputs,
                  api_name="chat", concurrency_id=MODEL)
            again.click(_streamed(app.regenerate), [turns, *decoding], outputs, api_name="regenerate",
                        concurrency_id=MODEL)
            clear.click(lambda: ([], [], "", ""), None, outputs, api_name="clear")
        with gr.Tab("Side by side", id="side"):
            side_message = gr.Textbox(label="message", elem_id="side-message")
            compare = gr.Button("Answer with both", variant="primary", elem_id="side-send")
            with gr.Row():
                tuned = gr.Textbox(label="tuned (adapter)", interactive=False, lines=6, elem_id="side-tuned")
                base = gr.Textbox(label="base (adapter disabled)", interactive=False, lines=6, elem_id="side-base")
            side_info = gr.Textbox(label="generation", interactive=False, elem_id="side-info")
            compare.click(_streamed(app.compare), [side_message, *decoding], [tuned, base, side_info],
                          api_name="compare", concurrency_id=MODEL)
        with gr.Tab("Blind rating", id="rate"):
            source = (f"Prompts from experiment {app.run} ({app.pairs} at most)" if app.run is not None
                      else "No run with replies in the registry: type your own prompts")
            gr.Markdown(f"{source}. The tuned and the base model answer each; which is A and which is B is "
                        f"drawn at random. Replies are greedy, at most {r.decoding.max_new_tokens} new tokens. "
                        f"Every judgement is saved in `{app.db}` at once.")
            session = gr.State(None)
            with gr.Row():
                rater = gr.Textbox(label="your name (rater)", elem_id="rate-rater")
                start = gr.Button("Start", variant="primary", elem_id="rate-start")
            with gr.Row():
                own = gr.Textbox(label="or type a prompt of your own", elem_id="rate-own", scale=4)
                own_go = gr.Button("Rate my prompt", elem_id="rate-own-go")
            progress = gr.Markdown(elem_id="rate-progress")
            prompt = gr.Textbox(label="prompt", interactive=False, elem_id="rate-prompt")
            replies, scores = [], []
            with gr.Row():
                for side in ("A", "B"):
                    with gr.Column():
                        replies.append(gr.Textbox(label=f"reply {side}", interactive=False, lines=5,
                                                  elem_id=f"rate-reply-{side}"))
                        scores += [gr.Radio(["1", "2", "3", "4", "5"], label=f"{side}: {aspect}",
                                            elem_id=f"rate-{side}-{aspect}") for aspect in ASPECTS]
            choice = gr.Radio(["A", "B", "tie"], label="which reply is more empathetic?", elem_id="rate-choice")
            comment = gr.Textbox(label="comment (optional)", elem_id="rate-comment")
            submit = gr.Button("Submit judgement", variant="primary", elem_id="rate-submit")
            shown = [session, progress, prompt, *replies, choice, comment, *scores]
            start.click(_shielded(app.start_rating), [rater, session], shown, api_name="rate_start",
                        concurrency_id=MODEL)
            own_go.click(_shielded(app.rate_own_prompt), [own, session], shown, api_name="rate_own",
                         concurrency_id=MODEL)
            submit.click(_shielded(app.submit), [rater, choice, comment, session, *scores], shown,
                         api_name="rate_submit", concurrency_id=MODEL)
        with gr.Tab("Runs", id="runs"):
            from ..evaluation.metrics import SCORE_NAMES

            table = gr.Dataframe(headers=["id", "time (UTC)", "stage", "steps", "blind judgements", "val/loss",
                                          *SCORE_NAMES, "model"], value=app.runs_table, interactive=False,
                                 wrap=True, elem_id="runs-table")
            with gr.Row():
                chosen = gr.Number(label="experiment id", precision=0, elem_id="runs-id")
                show = gr.Button("Show run", elem_id="runs-show")
                refresh = gr.Button("Refresh", elem_id="runs-refresh")
            detail = gr.Markdown(elem_id="runs-detail")
            plots = gr.Gallery(label="plots", columns=2, height=420, elem_id="runs-plots")
            show.click(_shielded(app.run_detail), [chosen], [detail, plots], api_name="run_detail")
            refresh.click(app.runs_table, None, [table], api_name="runs")
        page.load(_logged_in_user, None, [rater], api_name=False)
    return page


def launch(replier: Replier, adapter_path: str, db: str, run: Optional[int], pairs: int, host: str, port: int,
           auth: list[tuple[str, str]], block: bool = True):
    """Serve the page on ``host:port`` (no share tunnel); with ``auth``, only those users get in.
    ``block``: serve until interrupted, else return the running page (tests)."""
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    page = build(App(replier, adapter_path, db, run, pairs))
    page.queue(default_concurrency_limit=1)
    try:
        page.launch(server_name=host, server_port=port, auth=auth or None, share=False, ssr_mode=False,
                    mcp_server=False, prevent_thread_lock=not block, auth_message="Log in to rate replies.",
                    # FastAPI's API description and docs pages would answer without a login
                    app_kwargs={"openapi_url": None, "docs_url": None, "redoc_url": None})
    except OSError as exc:  # the port is taken, or the address is not this machine's
        raise UserError(f"cannot serve on {host}:{port}: {' '.join(str(exc).split())}") from exc
    return page
