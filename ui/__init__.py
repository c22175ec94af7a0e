"""Streamlit front-end helpers shared by app.py and the pages (the library, rcpu/, has no Streamlit)."""
