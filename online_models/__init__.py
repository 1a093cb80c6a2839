"""Pure, batch-first online learners: numpy maths only, no Faust, Kafka or Redis imports."""
