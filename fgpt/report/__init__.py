"""The assessment study behind `just report`: budgets, training arms, measurements, the
recall probe, plots and the markdown writer."""
