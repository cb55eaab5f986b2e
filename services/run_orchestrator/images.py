"""The images messages link to (`image_url` parts with an http(s) URL), fetched for model servers that take images
only as data URLs (Ollama refuses image URLs): through the SSRF guard, as the URL is the user's and the network the
orchestrator's."""

from run_orchestrator.prompt import IMAGE_TYPES, data_url, sniffed_image_type
from threadline_core.ssrf import GuardedHttpClient, HttpFetchError, ResponseTooLarge, SsrfError


class ImageFetchError(Exception):
    """An image the prompt links to could not be had: the prompt's fault (the run fails `invalid_prompt`, no retry)."""


class LinkedImages:
    """Fetches a linked image whole (bounded in bytes and time) and gives it as a data URL."""

    def __init__(self, http: GuardedHttpClient, *, max_bytes: int, timeout: float) -> None:
        self._http = http
        self._max_bytes = max_bytes
        self._timeout = timeout

    async def data_url(self, url: str) -> str:
        """The image at `url` as a data URL; ImageFetchError naming the URL and why it cannot be."""
        try:
            response = await self._http.get(url, time_limit=self._timeout, max_bytes=self._max_bytes,
                                             headers={"Accept": ", ".join(sorted(IMAGE_TYPES))})
        except SsrfError as exc:
            raise _failure(url, f"refused (THREADLINE_IMAGE_FETCH_ALLOWED_NETWORKS): {exc}") from exc
        except ResponseTooLarge as exc:
            too_large = f"it is larger than {self._max_bytes} bytes (THREADLINE_IMAGE_FETCH_MAX_BYTES)"
            raise _failure(url, too_large) from exc
        except HttpFetchError as exc:
            raise _failure(url, str(exc)) from exc
        if not 200 <= response.status_code < 300:
            raise _failure(url, f"HTTP {response.status_code}")
        declared = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        mime = declared if declared in IMAGE_TYPES else sniffed_image_type(response.content)
        if mime is None:
            raise _failure(url, f"it is not a PNG, JPEG, GIF or WebP image (Content-Type: {declared or 'none'})")
        return data_url(mime, response.content)


def _failure(url: str, why: str) -> ImageFetchError:
    return ImageFetchError(f"Could not fetch the image at {url} for the model: {why.rstrip('.')}.")
