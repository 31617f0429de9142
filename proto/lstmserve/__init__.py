"""Generated lstmserve protocol code plus the hand-written wire codec shared by server and client."""
