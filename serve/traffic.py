"""What a shop's traffic needs from the ingress, beside the try-on itself (issue 28, items 2-3): who
is calling (a customer key with its models and rate, :mod:`serve.keys`), which model answers (the
one named, an experiment's arm for this user, or the default, :mod:`serve.experiments`), and a
durable record of every answer and of the users' feedback (``args.events``, read by
``python -m serve.ab_report``).

A request names its model with ``x-tryon-model`` (or the ``model`` form field). One naming none,
from a user (``x-tryon-user``) while an experiment runs, gets that user's arm: the same arm every
time (a hash of the user id), so a user's pictures stay consistent and a preference measured on
them means something. The answer names its model (``X-Tryon-Model``) and its request id
(``X-Request-Id``), which ``POST /v1/feedback`` refers to.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from fastapi import FastAPI, Request

from catvton.infer.registry import MODEL_ID
from catvton.infer.request import InputError
from catvton.infer.serving import ServeConfig, repo_path
from serve.experiments import EventLog, Experiment, UnknownRequest, assign, parse_experiments
from serve.keys import KeyQuota, KeyRing, Usage

USER_HEADER = "x-tryon-user"
REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
"""A request id taken as it comes: what Serve generates (a UUID) or a client's own of that form."""
EXPERIMENT_HEADER = "x-tryon-experiment"


class Traffic:
    """Keys, experiments and the event log of one ingress, from its settings."""

    def __init__(self, settings: ServeConfig):
        self.experiments: list[Experiment] = parse_experiments(settings.experiments or None)
        self.events = EventLog(repo_path(settings.events)) if settings.events else None
        self.ring = KeyRing.load(repo_path(settings.keys_file)) if settings.keys_file else None
        self.usage = Usage()

    def guard(self, app: FastAPI, open_paths: tuple[str, ...], open_prefixes: tuple[str, ...]) -> bool:
        """Put the customer-key middleware on ``app`` when a keys file is set (True)."""
        if self.ring is None:
            return False
        app.add_middleware(KeyQuota, ring=self.ring, usage=self.usage, open_paths=open_paths,
                           open_prefixes=open_prefixes)
        return True

    @staticmethod
    def allowed(request: Request) -> list[str] | None:
        """The caller's models (``["*"]``: all), or None without customer keys."""
        key = request.scope.get("state", {}).get("api_key")
        return None if key is None else list(key["models"])

    def choose(self, request: Request, named: str | None) -> tuple[str | None, str | None, str | None]:
        """``(model, experiment, user)`` of a request: the model it names, else its user's arm of
        the running experiment (``x-tryon-experiment`` picks one; the first by default), else None
        (the server's default). A request naming both an experiment and one of its arms (the page's
        side-by-side comparison) counts in that experiment. A model the caller's key may not use is
        a 404 listing its own."""
        if named is not None and not MODEL_ID.match(named):
            raise InputError("model", f"{named[:80]!r} is not a model id (letters, digits, . _ -; at most 64): "
                             "GET /v1/models lists them")
        user = request.headers.get(USER_HEADER) or None
        wanted = request.headers.get(EXPERIMENT_HEADER)
        running = next((e for e in self.experiments if e.name == wanted), None) if wanted else \
            (self.experiments[0] if self.experiments else None)
        if wanted and running is None:
            raise InputError(EXPERIMENT_HEADER, f"no experiment {wanted!r}: running "
                             f"{[e.name for e in self.experiments]}", status=404)
        experiment, model = None, named
        if model is None and user and running is not None:
            experiment, model = running.name, assign(running, user)
        elif wanted and model in running.arms:  # a side-by-side page asks each arm by name, in the experiment
            experiment = running.name
        allowed = self.allowed(request)
        if allowed is not None and "*" not in allowed and (model is None or model not in allowed):
            raise InputError("model", f"name a model this key may use: {sorted(allowed)}", status=404)
        return model, experiment, user

    def visible(self, request: Request, listed: dict[str, Any]) -> dict[str, Any]:
        """``GET /v1/models`` as the caller may see it, with the running experiments (name and arms,
        the page's side-by-side comparison): another key's models are not listed, nor an experiment
        arm the key may not use (an experiment left with fewer than two is not listed)."""
        allowed = self.allowed(request)
        everything = allowed is None or "*" in allowed
        keep = set(allowed or ())
        experiments = [{"name": e.name, "arms": {m: w for m, w in e.arms.items() if everything or m in keep}}
                       for e in self.experiments]
        listed = {**listed, "experiments": [e for e in experiments if len(e["arms"]) >= 2]}
        if everything:
            return listed
        return {**listed, "models": [m for m in listed.get("models", []) if m["id"] in keep],
                "refused": {k: v for k, v in listed.get("refused", {}).items() if k in keep},
                "loaded": [m for m in listed.get("loaded", []) if m in keep],
                "default": listed.get("default") if listed.get("default") in keep else None}

    def request_id(self, request: Request) -> tuple[str, bool]:
        """The id an answer is recorded and referred to by (``POST /v1/feedback``), and whether the
        answer must carry it in ``X-Request-Id``. Ray Serve's proxy gives every request an
        ``x-request-id`` (the client's, if it sent one) and puts that header on the answer itself:
        the ingress uses that id and adds no second header (two were sent before, joined by a comma,
        and feedback on the joined string found no request). A request without one (the ingress
        run without Serve), with a malformed one or one already recorded gets a new id, sent back."""
        given = request.headers.get(REQUEST_ID_HEADER, "")
        if REQUEST_ID.match(given) and (self.events is None or not self.events.has_request(given)):
            return given, False
        return uuid.uuid4().hex, True

    def record(self, request_id: str, model: str | None, experiment: str | None, user: str | None, status: int,
               latency_s: float | None, error: str | None = None) -> None:
        """The answer's event, when an event log is set."""
        if self.events is not None:
            self.events.record_request(request_id, model or "default", experiment=experiment, user_id=user,
                                       status=status, latency_s=latency_s, error=error)

    def feedback(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/feedback``: a choice between two answers, or a 1-5 rating of one."""
        if self.events is None:
            raise InputError("events", "this server keeps no event log (args.events): feedback is not recorded",
                             status=404)
        if not isinstance(body, dict) or not isinstance(body.get("request_id"), str):
            raise InputError("request_id", "send JSON with request_id (from X-Request-Id) and either rating "
                             "(1-5) or other_request_id and preferred_request_id", status=400)
        try:
            if "rating" in body:
                self.events.record_rating(body["request_id"], body["rating"])
                return {"recorded": "rating"}
            self.events.record_choice(body["request_id"], body.get("other_request_id"),
                                      body.get("preferred_request_id"), user_id=body.get("user_id"))
            return {"recorded": "choice"}
        except UnknownRequest as e:  # an answer this server never gave: nothing to attach the feedback to
            raise InputError("request_id", str(e), status=404) from e
        except ValueError as e:
            raise InputError("request_id", str(e)) from e
