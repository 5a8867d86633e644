"""The model library: the precision variants one server holds, with load, replace and unload while serving.

A `ModelLibrary` is KServe's `ModelRepository` for costopt's variants, so KServe's own endpoints
(`/v2/models/{name}/ready`, `/v2/models/{name}/infer`, the repository index) see every variant. A
hot switch never fails a request: `load(name)` builds the new `VariantModel` off the event loop while
the old one keeps serving, then swaps the name over in one step; the old model's engine loop retires,
finishing every request it had queued or running on the old weights, and is dropped. Handlers that
picked up the old model just as it retired get `Retired` and resubmit to the new one (`submit`).
`unload(name)` takes the name out at once; requests in flight still finish.
"""
from __future__ import annotations

import asyncio
import re
from typing import Any, Sequence

from kserve.model_repository import ModelRepository

from serving.driver import Generation, Retired
from costopt.runtimes.engine import SamplingParams
from serving.model import BASELINE, ServeOptions, VariantModel
from serving.protocol import ApiError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ModelLibrary(ModelRepository):
    def __init__(self, options: ServeOptions) -> None:
        super().__init__(models_dir="/nonexistent")  # variants come from the workspace, not a mount
        self.options = options
        self._switch = asyncio.Lock()
        self._retiring: set[asyncio.Task] = set()

    def available(self) -> list[str]:
        """Variant names the workspace holds (loadable), fp32 first."""
        from costopt.storage.layout import Workspace

        ws = Workspace(self.options.workspace)
        names = [BASELINE] if (ws.model_dir / "model.safetensors").is_file() else []
        for root in (ws.variants_dir, ws.search_dir / "variants"):
            if root.is_dir():
                names += sorted(p.name for p in root.iterdir() if (p / "spec.json").is_file())
        return names

    def check_name(self, name: str) -> None:
        if not _NAME.match(name or ""):
            raise ApiError(400, f"model: {name!r} is not a variant name (letters, digits, _ . -)", param="model")
        if name not in self.available():
            raise ApiError(404, f"model: no variant {name!r} in workspace {self.options.workspace}; "
                                f"loadable: {', '.join(self.available()) or 'none (run the pipeline first)'}",
                           param="model", type_="model_not_found")

    def load_now(self, name: str) -> VariantModel:
        """Startup: build and register a variant synchronously (no loop is running yet)."""
        self.check_name(name)
        model = VariantModel(name, self.options)
        model.library = self
        model.load()
        self.update(model)
        return model

    async def load(self, name: str) -> bool:
        """Load `name`, or replace it with a fresh copy from the workspace, without failing a request."""
        self.check_name(name)
        async with self._switch:
            new = VariantModel(name, self.options)
            new.library = self
            await asyncio.to_thread(new.load)
            old = self.models.get(name)
            self.update(new, name)
            if old is not None and old is not new:
                self._retire(old)
        return True

    def unload(self, name: str) -> None:
        model = self.models.pop(name, None)
        if model is None:
            raise KeyError(f"model with name {name} does not exist")
        self._retire(model)

    def _retire(self, model: Any) -> None:
        async def retire() -> None:
            if isinstance(model, VariantModel) and model.loop is not None:
                await model.loop.retire()
            model.stop()

        task = asyncio.get_running_loop().create_task(retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def drained(self) -> None:
        """Wait until every retired model has finished its requests (tests, shutdown)."""
        while self._retiring:
            await asyncio.gather(*list(self._retiring))

    def served(self) -> list[str]:
        return sorted(n for n, m in self.models.items() if m.ready)

    def submit(self, name: str, prompt: Sequence[int] | Any, params: SamplingParams, priority: Any,
               deadline_s: float | None) -> tuple[VariantModel, Generation]:
        """Queue on the variant now serving `name`; a hot switch in between is retried, never failed."""
        for _ in range(3):
            model = self.get_model(name)
            if model is None:
                raise ApiError(404, f"model: {name!r} is not served here; served: "
                                    f"{', '.join(self.served()) or 'none'}", param="model", type_="model_not_found")
            try:
                return model, model.submit(prompt, params, priority, deadline_s)
            except Retired:
                continue
        raise ApiError(503, f"model {name!r} is switching; retry", type_="model_not_ready",
                       headers={"Retry-After": "1"})
