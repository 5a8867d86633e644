"""Measuring a model: held-out data (`evaldata`), quality metrics with CIs (`metrics`, `taskscore`), the stored fp32 reference (`reference`), speed (`speed`) and cost (`cost`)."""
