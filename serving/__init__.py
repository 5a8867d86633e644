"""costopt's serving side: the KServe model server and what stands in front of it."""
