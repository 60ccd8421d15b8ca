package org.mobilevmoe.bench

import android.content.Context
import android.os.Build
import android.os.Debug
import android.os.PowerManager
import java.io.File
import java.time.Instant
import kotlin.math.sqrt
import kotlin.random.Random
import org.json.JSONArray
import org.json.JSONObject
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor

/** One run's settings, from the launching intent (see BenchmarkActivity). */
data class BenchConfig(
    val modelPath: String,
    val shape: LongArray,
    val warmup: Int = 10,
    val iterations: Int = 50,
    /** 0 = the runtime's default thread count. */
    val threads: Int = 0,
    /** The export sidecar (FILE.pte.json): its `preprocess` is applied to the images. */
    val sidecarPath: String? = null,
    /** A directory of images (index.txt gives their order): iteration i runs on image i mod N; null: random. */
    val imagesDir: String? = null
)

/** The inputs of one run, prepared before the memory mark, and their description for the result. */
class PreparedInputs(val values: List<EValue>, val info: JSONObject)

/**
 * The images of [config] preprocessed as the sidecar says (resize the shorter side, centre crop, normalise), one
 * tensor each, or one random tensor.
 */
fun prepareInputs(config: BenchConfig): PreparedInputs {
    val info = JSONObject().put("shape", JSONArray(config.shape.toList())).put("dtype", "float32")
    val imagesDir = config.imagesDir
    val text = config.sidecarPath?.let { TextIds.fromSidecar(File(it)) }
    if (text != null) {
        require(imagesDir == null) { "a text encoder takes tokens, not images" }
        val s = config.shape
        require(s.size == 2) { "a text encoder's input is [1, L], got ${s.toList()}" }
        val input = EValue.from(Tensor.fromBlob(text.caption(s[1].toInt()), s))
        info.put("dtype", "int64").put("source", "tokens").put("images", JSONObject.NULL)
            .put("preprocess", JSONObject.NULL)
        return PreparedInputs(listOf(input), info)
    }
    if (imagesDir == null) {
        val numel = config.shape.fold(1L) { acc, d -> acc * d }.toInt()
        val rng = Random(0)
        val input = EValue.from(Tensor.fromBlob(FloatArray(numel) { rng.nextFloat() * 2f - 1f }, config.shape))
        info.put("source", "random").put("images", JSONObject.NULL).put("preprocess", JSONObject.NULL)
        return PreparedInputs(listOf(input), info)
    }
    val sidecar = requireNotNull(config.sidecarPath) {
        "--es images needs --es sidecar FILE.pte.json: its preprocess says how to resize, crop and normalise them"
    }
    val pre = Preprocess.fromSidecar(File(sidecar))
    val s = config.shape
    require(s.size == 4 && s[1] == 3L && s[2] == pre.size.toLong() && s[3] == pre.size.toLong()) {
        "the program's input is ${s.toList()} but the sidecar's preprocess makes [1, 3, ${pre.size}, ${pre.size}]"
    }
    val files = Preprocess.imageFiles(File(imagesDir)).take(config.iterations)
    val values = files.map { EValue.from(Tensor.fromBlob(pre.normalised(pre.crop(it)), config.shape)) }
    info.put("source", "images")
        .put("images", JSONObject().put("dir", imagesDir).put("count", files.size))
        .put("preprocess", pre.toJson())
    return PreparedInputs(values, info)
}

/**
 * A text encoder's token ids (the sidecar's `text`, kind "text_encoder"): its input is one caption of the full
 * context, [SOT, "a" ..., EOT] (latency does not depend on the words: every shape is static).
 */
data class TextIds(val sot: Long, val eot: Long) {
    companion object {
        const val FILLER = 320L // "a" in CLIP's BPE vocabulary

        /** null for an image model's sidecar. */
        fun fromSidecar(file: File): TextIds? {
            val obj = JSONObject(file.readText())
            if (obj.optString("kind") != "text_encoder") return null
            val text = requireNotNull(obj.optJSONObject("text")) {
                "${file.path}: a text encoder's sidecar needs text.sot_id and text.eot_id"
            }
            return TextIds(text.getLong("sot_id"), text.getLong("eot_id"))
        }
    }

    fun caption(length: Int): LongArray = LongArray(length) { if (it == 0) sot else if (it == length - 1) eot else FILLER }
}

/** Same conventions as mobile_vmoe.bench.latency_stats (numpy linear percentiles, ddof = 0 std). */
object Stats {
    fun percentile(sorted: DoubleArray, q: Double): Double {
        if (sorted.size == 1) return sorted[0]
        val pos = q / 100.0 * (sorted.size - 1)
        val lo = pos.toInt()
        val hi = minOf(lo + 1, sorted.size - 1)
        return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo)
    }

    fun of(samples: List<Double>): JSONObject {
        val a = samples.sorted().toDoubleArray()
        val mean = a.average()
        val std = sqrt(a.sumOf { (it - mean) * (it - mean) } / a.size)
        return JSONObject()
            .put("count", a.size)
            .put("p50", percentile(a, 50.0))
            .put("p90", percentile(a, 90.0))
            .put("p99", percentile(a, 99.0))
            .put("mean", mean)
            .put("std", std)
            .put("min", a.first())
            .put("max", a.last())
    }
}

object Platform {
    /** A field of /proc/self/status in bytes (VmRSS, VmHWM: the kernel reports kB). */
    fun procStatusBytes(field: String): Long? =
        try {
            File("/proc/self/status").readLines()
                .firstOrNull { it.startsWith("$field:") }
                ?.trim()?.split(Regex("\\s+"))?.getOrNull(1)?.toLongOrNull()?.times(1024)
        } catch (e: Exception) {
            null
        }

    /** Reset VmHWM to the current RSS (Linux clear_refs "5"); SELinux may refuse it. */
    fun resetPeakRss(): Boolean =
        try {
            File("/proc/self/clear_refs").writeText("5")
            true
        } catch (e: Exception) {
            false
        }

    fun pssTotalBytes(): Long {
        val info = Debug.MemoryInfo()
        Debug.getMemoryInfo(info)
        return info.totalPss.toLong() * 1024
    }

    fun thermal(context: Context): JSONObject {
        val pm = context.getSystemService(Context.POWER_SERVICE) as PowerManager
        val state = when (pm.currentThermalStatus) {
            PowerManager.THERMAL_STATUS_NONE -> "none"
            PowerManager.THERMAL_STATUS_LIGHT -> "light"
            PowerManager.THERMAL_STATUS_MODERATE -> "moderate"
            PowerManager.THERMAL_STATUS_SEVERE -> "severe"
            PowerManager.THERMAL_STATUS_CRITICAL -> "critical"
            PowerManager.THERMAL_STATUS_EMERGENCY -> "emergency"
            PowerManager.THERMAL_STATUS_SHUTDOWN -> "shutdown"
            else -> "unknown"
        }
        return JSONObject().put("state", state).put("zones_celsius", JSONObject.NULL)
    }

    fun device(): JSONObject {
        val chip = if (Build.VERSION.SDK_INT >= 31) "${Build.SOC_MANUFACTURER} ${Build.SOC_MODEL}" else Build.HARDWARE
        return JSONObject()
            .put("model", "${Build.MANUFACTURER} ${Build.MODEL}")
            .put("os", "Android")
            .put("os_version", "${Build.VERSION.RELEASE} (API ${Build.VERSION.SDK_INT})")
            .put("chip", chip)
            .put("cpu_count", Runtime.getRuntime().availableProcessors())
    }
}

object Benchmark {
    private fun ms(t0: Long, t1: Long): Double = (t1 - t0) / 1e6

    /**
     * Load the program and its "forward" method (cold load), time the first inference, run `warmup` untimed and
     * `iterations` timed inferences (iteration i on image i mod N, or on one random input), and return the bench
     * result (schema 1.0) as JSON.
     */
    fun run(context: Context, config: BenchConfig): JSONObject {
        require(config.warmup >= 0 && config.iterations >= 1) {
            "warmup must be >= 0 and iterations >= 1, got ${config.warmup} and ${config.iterations}"
        }
        val file = File(config.modelPath)
        require(file.isFile && file.canRead()) { "model not readable: ${config.modelPath} (adb push it first)" }
        val notes = JSONArray()
        val prepared = prepareInputs(config)
        val inputs = prepared.values
        val n = inputs.size

        val peakReset = Platform.resetPeakRss()
        if (!peakReset) notes.put("could not reset VmHWM before loading: peak_bytes includes the app's start-up")
        val before = Platform.procStatusBytes("VmRSS")
        val t0 = System.nanoTime()
        val module = Module.load(config.modelPath, Module.LOAD_MODE_MMAP, config.threads)
        val t1 = System.nanoTime()
        module.loadMethod("forward")
        val t2 = System.nanoTime()
        val breakdown = JSONObject().put("load_program", ms(t0, t1)).put("load_method", ms(t1, t2))

        val t3 = System.nanoTime()
        module.forward(inputs[0])
        val first = ms(t3, System.nanoTime())

        val thermalBefore = Platform.thermal(context)
        repeat(config.warmup) { j -> module.forward(inputs[j % n]) }
        val samples = ArrayList<Double>(config.iterations)
        repeat(config.iterations) { i ->
            val x = inputs[i % n]
            val t = System.nanoTime()
            module.forward(x)
            samples.add(ms(t, System.nanoTime()))
        }
        val thermalAfter = Platform.thermal(context)
        val peak = Platform.procStatusBytes("VmHWM")
        val pss = Platform.pssTotalBytes()
        module.destroy()
        notes.put(
            if (config.imagesDir != null)
                "latency_per_expert: null on the device (no routing here); `mobile-vmoe bench --target android " +
                    "--images` fills it in on the host from the image order"
            else "latency_per_expert: null (the device harness ran one random input; see docs/BENCH_SCHEMA.md)"
        )

        val delta: Any = if (peak != null && before != null && peakReset) peak - before else JSONObject.NULL
        return JSONObject()
            .put("schema_version", "1.0")
            .put("created_at", Instant.now().toString())
            .put("harness", JSONObject().put("name", "android_bench").put("version", "1.1")
                .put("isolated_process", true))
            .put("device", Platform.device())
            .put("runtime", JSONObject().put("name", "executorch").put("version", BuildConfig.EXECUTORCH_VERSION))
            .put("backend", JSONObject()
                .put("name", "cpu")
                .put("compute_units", JSONObject.NULL)
                .put("threads", if (config.threads > 0) config.threads else JSONObject.NULL)
                .put("delegates", JSONArray())
                .put("compute_plan", JSONObject.NULL))
            .put("model", JSONObject()
                .put("path", config.modelPath)
                .put("format", "pte")
                .put("size_bytes", file.length())
                .put("name", JSONObject.NULL)
                .put("sidecar", JSONObject.NULL)
                .put("routing", JSONObject.NULL))
            .put("precision", JSONObject.NULL)
            .put("input", prepared.info)
            .put("warmup_iterations", config.warmup)
            .put("timed_iterations", config.iterations)
            .put("cold_load_ms", ms(t0, t2))
            .put("load_breakdown_ms", breakdown)
            .put("first_inference_ms", first)
            .put("samples_ms", JSONArray(samples))
            .put("stats", Stats.of(samples))
            .put("memory", JSONObject()
                .put("kind", "VmHWM")
                .put("peak_bytes", peak ?: JSONObject.NULL)
                .put("before_load_bytes", before ?: JSONObject.NULL)
                .put("delta_bytes", delta)
                .put("pss_total_bytes", pss))
            .put("thermal_before", thermalBefore)
            .put("thermal_after", thermalAfter)
            .put("latency_per_expert", JSONObject.NULL)
            .put("notes", notes)
    }
}
