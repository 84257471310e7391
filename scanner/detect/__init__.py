"""Detection: norm statistics, the scan, trigger synthesis, the verdict, weights-only signals."""
