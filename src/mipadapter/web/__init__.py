"""The web demo (``mipadapter web``): a Gradio page over the library.

``handler`` holds the plain function the page calls (no gradio import: tests call it directly);
``app`` builds and serves the page (imports gradio, from the ``[web]`` extra).
"""
