"""ComfyUI entry point of the Rolling Forcing node pack (V3 ``comfy_entrypoint``).

Importing this package outside ComfyUI does nothing heavy and does not fail; the nodes (and
ComfyUI's own modules) are only imported when ComfyUI asks for the extension.
"""


async def comfy_entrypoint():
    from .nodes import RollingForcingExtension

    return RollingForcingExtension()
