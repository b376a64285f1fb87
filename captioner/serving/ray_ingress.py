"""The HTTP ingress of the Ray application: the FastAPI app of ``captioner.serving.http`` served by
Serve's proxies, over a CaptionService that forwards to the captioner deployment's handle.

Kept apart from the captioner deployment so that a cluster without the HTTP API (or a test of the
captioner alone) never imports FastAPI or the API-key store.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from .ray_spec import INGRESS, RaySpec


def http_ingress() -> Any:
    """The ingress deployment class (built on demand: importing it needs the HTTP modules)."""
    from .http import create_app
    from .keys import ApiKeys
    from .ray_service import RayCaptionService

    @serve.deployment(name=INGRESS, ray_actor_options={"num_cpus": 0})
    @serve.ingress()
    class HttpIngress:
        def __init__(self, captioner: Any, spec: dict[str, Any]) -> None:
            self.spec = RaySpec.from_args(spec)
            if not self.spec.keys_file:
                raise ValueError("the HTTP API needs an API key file (--keys)")
            self.keys_file: str = self.spec.keys_file
            self.service = RayCaptionService.over_handle(captioner, self.spec)

        def __serve_build_asgi_app__(self) -> Any:
            # Built on the replica, after __init__: the app's routes call this replica's service.
            return create_app(self.service, ApiKeys(self.keys_file),
                              requests_per_minute=self.spec.requests_per_minute,
                              image_limits=self.spec.image_limits)

    return HttpIngress
